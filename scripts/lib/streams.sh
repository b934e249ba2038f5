# Shell functions shared by the link benchmarks (scripts/link-bench, scripts/tls-cost).
# The caller sets: bin (the vmigrate binary), prefix (scripts/netns prefix, namespaces up),
# out (a scratch directory), bytes (per stream).

# Busy CPU time of the whole machine so far, in USER_HZ ticks (all of /proc/stat's first
# line but idle and iowait).
busy() {
    awk '/^cpu / { print $2 + $3 + $4 + $7 + $8 + $9; exit }' /proc/stat
}

# A stream (or --streams N): recv in the destination namespace, send in the source namespace; or, for
# kernel-loopback, the kernel's TCP on 127.0.0.1 in this namespace.
stream() {
    local name=$1 port=$2; shift 2
    # Options for both ends (e.g. --tls-psk FILE).
    local both=("$@")
    # Anything after `--` (DPDK's EAL arguments) must come last.
    local recv_args=() send_args=() recv_eal=() send_eal=()
    # 4 MiB windows: the receiving core is the bottleneck here, and frames queue in its ring.
    local ours=(--socket-buffer 4MiB)
    local in_dst=(scripts/netns exec dst --prefix "$prefix" --) in_src=(scripts/netns exec src --prefix "$prefix" --)
    if [ "$name" = kernel-loopback ]; then
        in_dst=() in_src=()
        recv_args=(--listen "127.0.0.1:$port")
        send_args=(--to "127.0.0.1:$port")
    elif [ "$name" = tap ]; then
        recv_args=(--stack tap --iface tap0 --ip 10.77.0.12/24 --listen "10.77.0.12:$port" "${ours[@]}")
        send_args=(--stack tap --iface tap0 --ip 10.77.0.11/24 --to "10.77.0.12:$port" "${ours[@]}")
    elif [ "$name" = dpdk ]; then
        local eal=(--no-huge -m 256 --no-pci --log-level=error --vdev)
        recv_args=(--stack dpdk --iface net_af_packet0 --ip 10.77.0.12/24 --listen "10.77.0.12:$port" "${ours[@]}")
        recv_eal=(-- "${eal[@]}" "net_af_packet0,iface=$prefix-vd" -l 0 --file-prefix "$prefix-dst")
        send_args=(--stack dpdk --iface net_af_packet0 --ip 10.77.0.11/24 --to "10.77.0.12:$port" "${ours[@]}")
        send_eal=(-- "${eal[@]}" "net_af_packet0,iface=$prefix-vs" -l 1 --file-prefix "$prefix-src")
    elif [ "$name" = af-xdp ]; then
        # DPDK's AF_XDP driver: an XSK socket on queue 0 of each veth end.
        local eal=(--no-huge -m 256 --no-pci --log-level=error --vdev)
        recv_args=(--stack dpdk --iface net_af_xdp0 --ip 10.77.0.12/24 --listen "10.77.0.12:$port" "${ours[@]}")
        recv_eal=(-- "${eal[@]}" "net_af_xdp0,iface=$prefix-vd,start_queue=0,queue_count=1" -l 0 --file-prefix "$prefix-xd")
        send_args=(--stack dpdk --iface net_af_xdp0 --ip 10.77.0.11/24 --to "10.77.0.12:$port" "${ours[@]}")
        send_eal=(-- "${eal[@]}" "net_af_xdp0,iface=$prefix-vs,start_queue=0,queue_count=1" -l 1 --file-prefix "$prefix-xs")
    elif [ "$name" = memif ] || [ "$name" = memif-whole ]; then
        # Two processes on the two ends of a DPDK memif pair (shared memory, no kernel in
        # the path): the receiver is the memif socket's server. memif-whole: segments sent
        # whole through buffers that hold them (--whole-segments).
        in_dst=() in_src=()
        local eal=(--no-huge -m 256 --no-pci --log-level=error) socket="$out/memif.sock" buffers="" whole=()
        if [ "$name" = memif-whole ]; then buffers=",bsize=65535,rsize=8" whole=(--whole-segments); fi
        recv_args=(--stack dpdk --iface net_memif0 --ip 10.77.0.12/24 --listen "10.77.0.12:$port" "${ours[@]}" "${whole[@]}")
        recv_eal=(-- "${eal[@]}" --vdev "net_memif0,role=server,id=0,socket=$socket$buffers" -l 0 --file-prefix "$prefix-mr")
        send_args=(--stack dpdk --iface net_memif0 --ip 10.77.0.11/24 --to "10.77.0.12:$port" "${ours[@]}" "${whole[@]}")
        send_eal=(-- "${eal[@]}" --vdev "net_memif0,role=client,id=0,socket=$socket$buffers" -l 1 --file-prefix "$prefix-ms")
    elif [ "$name" = af-packet ]; then
        recv_args=(--stack af-packet --iface "$prefix-vd" --ip 10.77.0.12/24 --listen "10.77.0.12:$port" "${ours[@]}")
        send_args=(--stack af-packet --iface "$prefix-vs" --ip 10.77.0.11/24 --to "10.77.0.12:$port" "${ours[@]}")
    else
        recv_args=(--listen "10.77.0.2:$port")
        send_args=(--to "10.77.0.2:$port")
    fi
    "${in_dst[@]}" "$bin" stream-recv "${recv_args[@]}" "${both[@]}" "${recv_eal[@]}" \
        >"$out/recv.json" 2>"$out/recv.log" &
    local recv_pid=$!
    for _ in $(seq 100); do grep -q waiting "$out/recv.log" 2>/dev/null && break; sleep 0.05; done
    local before after
    before=$(busy)
    "${in_src[@]}" "$bin" stream-send "${send_args[@]}" "${both[@]}" --bytes "$bytes" "${send_eal[@]}" \
        >"$out/send.json"
    wait "$recv_pid"
    after=$(busy)
    python3 - "$out/send.json" "$out/recv.json" "$((after - before))" <<'PY'
import json, sys
send, recv = (json.load(open(p)) for p in sys.argv[1:3])
machine = int(sys.argv[3]) * 1e7 / send["bytes"]  # ticks of 10 ms, in ns per byte
print(json.dumps({"gbit-per-s": recv["gbit-per-s"], "cpu-ns-per-byte": send["cpu-ns-per-byte"] + recv["cpu-ns-per-byte"], "machine-ns-per-byte": machine}))
PY
}

# The in-process wire: one process, whose CPU time is its own figure.
loopback() {
    local before after result
    before=$(busy)
    result=$("$bin" stream-loopback --bytes "$bytes" "$@")
    after=$(busy)
    python3 - "$result" "$((after - before))" <<'PY'
import json, sys
r = json.loads(sys.argv[1])
r["machine-ns-per-byte"] = int(sys.argv[2]) * 1e7 / r["bytes"]
print(json.dumps(r))
PY
}

