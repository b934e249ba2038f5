"""Helpers shared by the QEMU scripts (scripts/qemu-bench, scripts/guest-image): QMP over a
unix socket, and waiting for a line on a guest's serial log."""

import json
import re
import socket
import time


class Qmp:
    """QMP over a unix socket: one JSON object per line."""

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
