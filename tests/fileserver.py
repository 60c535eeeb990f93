"""A loopback static file server with HTTP Range support and injectable faults.

Run as a subprocess (`python tests/fileserver.py ROOT PORT [FAULTS_JSON]`): GDAL holds the GIL
while it reads over HTTP, so a server thread in the test process would deadlock.
FAULTS_JSON maps URL paths to "500" (always fail), "flaky:N" (fail the first N requests) or
"truncate:N" (serve only the first N bytes of the file, as a broken upload would).
"""

from __future__ import annotations

import functools
import json
import sys
import threading
from http.server import ThreadingHTTPServer
from pathlib import Path

from RangeHTTPServer import RangeRequestHandler


class FaultyRangeHandler(RangeRequestHandler):
    faults: dict[str, str] = {}
    failures_left: dict[str, int] = {}
    lock = threading.Lock()

    def log_message(self, *args) -> None:
        pass

    def _fault(self) -> str | None:
        path = self.path.split("?", 1)[0]
        rule = self.faults.get(path)
        if rule is None:
            return None
        if rule.startswith("flaky:"):
            with self.lock:
                left = self.failures_left.setdefault(path, int(rule.split(":", 1)[1]))
                if left <= 0:
                    return None
                self.failures_left[path] = left - 1
            return "500"
        return rule

    def send_head(self):
        fault = self._fault()
        if fault == "500":
            self.send_error(500, "injected failure")
            return None
        if fault and fault.startswith("truncate:"):
            self._truncate_to = int(fault.split(":", 1)[1])
        return super().send_head()

    def copyfile(self, source, outputfile):
        limit = getattr(self, "_truncate_to", None)
        if limit is None:
            return super().copyfile(source, outputfile)
        remaining = max(0, limit - source.tell())
        outputfile.write(source.read(remaining))
        self.close_connection = True


def main() -> None:
    root, port = Path(sys.argv[1]), int(sys.argv[2])
    FaultyRangeHandler.faults = json.loads(sys.argv[3]) if len(sys.argv) > 3 else {}
    handler = functools.partial(FaultyRangeHandler, directory=str(root))
    server = ThreadingHTTPServer(("127.0.0.1", port), handler)
    print("ready", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
