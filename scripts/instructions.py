"""Instructions per proxied request (callgrind's Ir): nginx doing the load run's job,
this build, and optionally a baseline build, the hyper-floor gateway and perf/floors.

Each gateway runs under callgrind twice, serving N/10 and N keep-alive GETs of the load
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


def instructions(argv, ready, stops, work, name, port, count):
    """Callgrind's total instructions for `argv` (serving on `port`, ready when
    `ready()` returns) over a run serving `count` requests; `stops` holds the
    exit codes its SIGTERM may end with (callgrind writes its counts either way)."""
    out = work / f"{name}.callgrind"
    with open(work / f"{name}.log", "wb") as log:
        process = subprocess.Popen(
            ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}"] + argv,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        ready()
        served = send(port, count)
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=300)
        except subprocess.TimeoutExpired:
            process.kill()
            raise SystemExit(f"instructions: {name} did not stop on SIGTERM")
    if process.returncode not in stops:
        raise SystemExit(f"instructions: {name} exited with {process.returncode} (log: {work / name}.log)")
    for line in out.read_text().splitlines():
        if line.startswith(("summary:", "totals:")):
            return served, int(line.split()[1])
    raise SystemExit(f"instructions: no total in {out}")


def tallyfy(binary):
    """A tallyfy-proxy build with the load run's config, ready on its /readyz."""
    def launch(work, name, up_port):
        port, admin = L.free_port(), L.free_port()
        argv = [binary, "run", "--config", str(L.proxy_conf(work, name, port, admin, up_port))]
        return argv, port, lambda: L.wait_ready(admin, timeout=120), (0,)
    return launch


def listening(argv_for):
    """Any other gateway, given its argv for (work, name, port, upstream port),
    ready when its port accepts; the floors have no SIGTERM handler, and die of it."""
    def launch(work, name, up_port):
        port = L.free_port()
        ready = lambda: L.wait_port(port, timeout=120)  # noqa: E731
        return argv_for(work, name, port, up_port), port, ready, (0, -signal.SIGTERM)
    return launch


def nginx(work, name, port, up_port):
    """The load run's nginx row (proxy_pass, its access log on), as one process:
    callgrind counts the process it starts, and a master's workers are others."""
    argv = L.nginx_conf(work, name, port, L.page_700_bytes(), up_port, access_log=True)
    return argv[:-1] + ["daemon off; master_process off;"]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--proxy", required=True)
    parser.add_argument("--baseline", help="another build's binary, measured the same way")
    parser.add_argument("--floor", default="", help="the hyper-floor gateway's binary (a row if given)")
    parser.add_argument("--floors", default="", help="perf/floors' binary (three rows if given)")
    parser.add_argument("--requests", type=int, default=8000, help="at least 80")
    parser.add_argument("--smoke", action="store_true", help="400 requests, nginx and this build only (CI)")
    args = parser.parse_args()
    if args.smoke:
        args.requests, args.floor, args.floors = 400, "", ""
    if args.requests < 80:
        parser.error("--requests must be at least 80 (ten per connection in the shorter run)")
    work = Path(tempfile.mkdtemp(prefix="tallyfy-instructions-"))
    up_port = L.free_port()
    upstream = None
    rows = []
    try:
        # Unpinned: pinning changes no instruction count.
        upstream = L.Target("upstream", L.nginx_conf(work, "upstream", up_port, L.page_700_bytes()), up_port, None)
        targets = [("nginx", listening(nginx))]
        if args.floor:
            targets.append(("hyper-floor", listening(lambda w, n, p, u: [args.floor, f"127.0.0.1:{p}",
                                                                           f"127.0.0.1:{u}", "current"])))
        if args.floors:
            for mode in L.FLOORS:
                targets.append((f"floor: {mode}", listening(
                    lambda w, n, p, u, mode=mode: [args.floors, mode, f"127.0.0.1:{p}", f"127.0.0.1:{u}"])))
        targets.append(("tallyfy-proxy", tallyfy(args.proxy)))
        if args.baseline:
            targets.append(("baseline", tallyfy(args.baseline)))
        for index, (name, launch) in enumerate(targets):
            totals = []
            for run, count in [("few", args.requests // 10), ("many", args.requests)]:
                key = f"{index}-{run}"
                argv, port, ready, stops = launch(work, key, up_port)
                totals.append(instructions(argv, ready, stops, work, key, port, count))
            (few, few_total), (many, many_total) = totals
            per_request = (many_total - few_total) / (many - few)
            rows.append((name, per_request))
            print(f"instructions: {name}: {per_request:,.0f} per request ({few} and {many} requests)", flush=True)
    finally:
        if upstream is not None:
            upstream.stop()
        shutil.rmtree(work, ignore_errors=True)
    nginx_row = rows[0][1]
    this_build = next(per_request for name, per_request in rows if name == "tallyfy-proxy")
    print()
    print("| gateway | instructions per request (user space) | vs nginx | vs this build |")
    print("|---|---|---|---|")
    for name, per_request in rows:
        print(f"| {name} | {per_request:,.0f} | {per_request / nginx_row:.2f}× | {per_request / this_build:.3f}× |")


if __name__ == "__main__":
    main()
