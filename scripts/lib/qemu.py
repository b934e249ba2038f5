"""Helpers shared by the QEMU scripts (scripts/qemu-bench, scripts/guest-image): QMP over a
unix socket, waiting for a line on a guest's serial log, and the RAM size that keeps QEMU
before 9.0 from losing a TCG guest's dirty pages in migration (tcg_safe_mem)."""

import json
import re
import socket
import subprocess
import time


class Qmp:
    """QMP over a unix socket: one JSON object per line. The events that arrive while a
    command waits for its reply are kept in `events`, with QEMU's own timestamps."""

    def __init__(self, path, timeout=60):
        deadline = time.time() + timeout
        while True:
            try:
                self.sock = socket.socket(socket.AF_UNIX)
                self.sock.connect(path)
                break
            except OSError:
                if time.time() > deadline:
                    raise
                time.sleep(0.1)
        self.file = self.sock.makefile("rw")
        self.events = []
        self.file.readline()
        self.execute("qmp_capabilities")

    def execute(self, command, **arguments):
        message = {"execute": command}
        if arguments:
            message["arguments"] = arguments
        self.file.write(json.dumps(message) + "\n")
        self.file.flush()
        while True:
            reply = json.loads(self.file.readline())
            if "return" in reply:
                return reply["return"]
            if "error" in reply:
                raise RuntimeError(f"QMP {command}: {reply['error']}")
            if "event" in reply:
                self.events.append(reply)

    def event_time(self, name, **data):
        """When QEMU emitted the first event `name` whose data holds `data` (seconds of the
        host's clock, as QEMU stamped it), or None if none has been seen yet."""
        for event in self.events:
            if event["event"] == name and all(event.get("data", {}).get(k) == v for k, v in data.items()):
                stamp = event["timestamp"]
                return stamp["seconds"] + stamp["microseconds"] / 1e6
        return None


def wait_serial(path, pattern, timeout, start=0):
    """Waits for a line matching `pattern` in the serial log past byte `start`."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            with open(path, errors="replace") as log:
                log.seek(start)
                match = re.search(pattern, log.read())
                if match:
                    return match
        except FileNotFoundError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"no {pattern!r} in {path} within {timeout} s")


def qemu_version(binary="qemu-system-x86_64"):
    """QEMU's (major, minor) version, from `BINARY --version`."""
    out = subprocess.run([binary, "--version"], check=True, capture_output=True, text=True).stdout
    match = re.search(r"version (\d+)\.(\d+)", out)
    if not match:
        raise RuntimeError(f"cannot read the version in {out!r}")
    return int(match.group(1)), int(match.group(2))


def parse_size(text):
    """Bytes in a size as `-m` takes it: 4G, 1024M, 1048584K, or a bare number of MiB."""
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    text = text.strip().upper().removesuffix("B")
    if text[-1:] in units:
        return int(float(text[:-1]) * units[text[-1]])
    return int(text) << 20


# QEMU before 9.0 loses dirty pages under TCG (fixed upstream by "physmem: Fix migration
# dirty bitmap coherency with TCG memory access", QEMU 9.0): the fast path of
# cpu_physical_memory_sync_dirty_bitmap(), taken for a RAM block whose length is a multiple
# of 64 pages (256 KiB, one bitmap word), clears the migration bitmap without resetting the
# TCG TLB's dirty state. The vCPU's later stores through TLB entries it still holds (the
# guest kernel's stacks, per-CPU data, timers, page tables: pages it touches all the time)
# then set no dirty bit, and the last version of such a page never goes out: the destination
# resumes with a few stale kernel pages and oopses or panics ("Fatal exception in
# interrupt" from the hrtimer code), QEMU's own migration as much as any other. The slow
# path (any other length) resets the TLB for every dirty page it clears, so the RAM size is
# nudged off the 256 KiB multiple.
TCG_DIRTY_FIX = (9, 0)
TCG_RAM_NUDGE = 8 << 10  # QEMU rounds -m to 8 KiB; this keeps it off a 256 KiB multiple


def tcg_safe_mem(mem, version=None):
    """The `-m` value to give a TCG guest of `mem` so that QEMU's migration does not lose
    its dirty pages: `mem` itself on QEMU 9.0 and later, or where its size is no multiple of
    256 KiB already; otherwise 8 KiB more, in KiB (4G -> 4194312K)."""
    version = version or qemu_version()
    size = parse_size(mem)
    if version >= TCG_DIRTY_FIX or size % (256 << 10) != 0:
        return mem
    return f"{(size + TCG_RAM_NUDGE) >> 10}K"
