"""Instructions per proxied request (callgrind's Ir), for this build and optionally a baseline.

Each binary runs under callgrind twice, serving N/10 and N keep-alive GETs of the load
scenario (`GET /api/organizations/{org}/me/tasks`, a 700-byte JSON page from an nginx
upstream, defaults on, the access log at info to a file); the difference of the two
totals over the difference of the requests leaves start-up and shutdown out. Only
user-space instructions are counted: the kernel's share (about two thirds of the CPU
time, mostly loopback TCP) is not, so this measures the proxy's own work.
"""
import argparse
import http.client
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import load as L  # noqa: E402  (the load scenario's upstream, config and helpers)

CONNECTIONS = 8


def send(port, count):
    """`count` GETs over CONNECTIONS keep-alive connections, each answer read
    whole; any answer but a 200 (or a failure) ends the measurement."""
    failures = []

    def run(n):
        try:
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
            for _ in range(n):
                connection.request("GET", L.PATH)
                response = connection.getresponse()
                response.read()
                if response.status != 200:
                    failures.append(f"the proxy answered {response.status}")
                    return
            connection.close()
        except Exception as error:  # reported below, from the main thread
            failures.append(repr(error))

    threads = [threading.Thread(target=run, args=(count // CONNECTIONS,)) for _ in range(CONNECTIONS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if failures:
        raise SystemExit(f"instructions: {failures[0]}")
    return count // CONNECTIONS * CONNECTIONS


def instructions(binary, work, name, up_port, count):
    """Callgrind's total instructions for a run serving `count` requests."""
    port, admin = L.free_port(), L.free_port()
    argv = [binary, "run", "--config", str(L.proxy_conf(work, name, port, admin, up_port))]
    out = work / f"{name}.callgrind"
    with open(work / f"{name}.log", "wb") as log:
        proxy = subprocess.Popen(
            ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}"] + argv,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        L.wait_ready(admin, timeout=120)
        served = send(port, count)
    finally:
        proxy.send_signal(signal.SIGTERM)
        try:
            proxy.wait(timeout=300)
        except subprocess.TimeoutExpired:
            proxy.kill()
            raise SystemExit(f"instructions: {name} did not stop on SIGTERM")
    if proxy.returncode != 0:
        raise SystemExit(f"instructions: {name} exited with {proxy.returncode} (log: {work / name}.log)")
    for line in out.read_text().splitlines():
        if line.startswith(("summary:", "totals:")):
            return served, int(line.split()[1])
    raise SystemExit(f"instructions: no total in {out}")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--proxy", required=True)
    parser.add_argument("--baseline", help="another build's binary, measured the same way")
    parser.add_argument("--requests", type=int, default=8000, help="at least 80")
    args = parser.parse_args()
    if args.requests < 80:
        parser.error("--requests must be at least 80 (ten per connection in the shorter run)")
    work = Path(tempfile.mkdtemp(prefix="tallyfy-instructions-"))
    up_port = L.free_port()
    upstream = None
    rows = []
    try:
        # Unpinned: pinning changes no instruction count.
        upstream = L.Target("upstream", L.nginx_conf(work, "upstream", up_port, L.page_700_bytes()), up_port, None)
        binaries = [("tallyfy-proxy", args.proxy)] + ([("baseline", args.baseline)] if args.baseline else [])
        for name, binary in binaries:
            few, few_total = instructions(binary, work, f"{name}-few", up_port, args.requests // 10)
            many, many_total = instructions(binary, work, f"{name}-many", up_port, args.requests)
            per_request = (many_total - few_total) / (many - few)
            rows.append((name, per_request))
            print(f"instructions: {name}: {per_request:,.0f} per request ({few} and {many} requests)", flush=True)
    finally:
        if upstream is not None:
            upstream.stop()
        shutil.rmtree(work, ignore_errors=True)
    print()
    print("| build | instructions per request (user space) | vs this build |")
    print("|---|---|---|")
    for name, per_request in rows:
        print(f"| {name} | {per_request:,.0f} | {per_request / rows[0][1]:.3f}× |")


if __name__ == "__main__":
    main()
