"""A ringllama-worker process serving HTTP on a free port, for the Python tests of the HTTP API and
the metrics: started with `--http-listen 127.0.0.1:0`, its port and model read back from its log
once it says ready."""
import os
import re
import signal
import subprocess
import time


class HttpWorker:
    def __init__(self, bin_dir, work, name, args, env=None):
        """`args`: the worker's arguments besides --listen (ipc://WORK/NAME.sock) and --http-listen."""
        self.log_path = os.path.join(work, name + ".log")
        self.zmq = "ipc://" + os.path.join(work, name + ".sock")
        self.log = open(self.log_path, "w")
        self.proc = subprocess.Popen([os.path.join(bin_dir, "ringllama-worker"), *args, "--listen", self.zmq,
                                      "--http-listen", "127.0.0.1:0"],
                                     stdout=self.log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            m = re.search(r"http: listening on http://127\.0\.0\.1:(\d+) \(model '([^']+)'", self.text())
            if m and "info: ready" in self.text():
                self.port, self.model = int(m.group(1)), m.group(2)
                return
            assert self.proc.poll() is None, self.text()
            time.sleep(0.05)
        raise AssertionError("the worker did not come up:\n" + self.text())

    def text(self):
        with open(self.log_path) as f:
            return f.read()

    def stop(self, drain=True):
        """SIGTERM and up to 30 s to drain (then SIGKILL); drain=False kills at once."""
        if self.proc.poll() is None:
            if drain:
                self.proc.send_signal(signal.SIGTERM)
                try:
                    self.proc.wait(30)
                except subprocess.TimeoutExpired:
                    pass
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
