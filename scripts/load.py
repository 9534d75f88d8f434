#!/usr/bin/env python3
"""Load comparison of tallyfy-proxy against nginx, HAProxy and a bare hyper gateway.

Everything runs on loopback. An nginx "upstream" answers a 700-byte JSON page (and
the token endpoint for the OAuth rows). Each proxy does the same job in front of
it: swap the credential, set X-Tallyfy-Client and Host, keep connections to the
upstream alive. wrk drives each target in turn, round after round (rounds
alternate targets so drift hits all of them alike), and the tables report the
median of the rounds.

CPU per request is the proxy's own utime+stime (all its processes) over the run,
divided by the requests it served. With at least 2 CPUs, wrk and the upstream are
pinned to CPU 0 and each proxy to CPU 1; otherwise nothing is pinned and the
script says so. Only the standard library is used.
"""

import argparse
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ORG = "5a3f9c1e7b2d4e6f8a0b1c2d3e4f5a6b"
PATH = f"/api/organizations/{ORG}/me/tasks"
TOKEN = "load-test-personal-token-0123456789abcdef"
CLK_TCK = os.sysconf("SC_CLK_TCK")


def page_700_bytes():
    """A Tallyfy-shaped list page of about 700 bytes, without upstream links."""
    task = {
        "id": "0" * 32,
        "title": "Prepare the quarterly report",
        "status": "active",
        "deadline": "2025-09-30T17:00:00.000Z",
        "owners": {"users": [1001], "guests": [], "groups": []},
    }
    page = {
        "data": [dict(task, id=f"{i:032x}") for i in range(3)],
        "meta": {"pagination": {"total": 3, "count": 3, "per_page": 10, "current_page": 1,
                                "total_pages": 1, "links": []}},
    }
    body = json.dumps(page, separators=(",", ":"))
    return body + " " * max(0, 700 - len(body))


def post_body_2k():
    """A 2 KiB task update holding three dates."""
    body = {
        "title": "Prepare Q3 report",
        "task_type": "task",
        "deadline": "2025-09-30T17:00:00Z",
        "started_at": "2025-09-01T09:00:00+02:00",
        "taskdata": {"8c01d2e3f4a5b6c7d8e9f0a1b2c3d4e5": "2025-08-15T00:00:00.000Z"},
        "summary": "",
    }
    text = json.dumps(body, separators=(",", ":"))
    body["summary"] = "x" * (2048 - len(text))
    return json.dumps(body, separators=(",", ":"))


_HANDED_OUT = set()


def free_port():
    """A loopback port nothing listens on, never one this run handed out before
    (the kernel may offer a just-closed port again before its target binds it)."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in _HANDED_OUT:
            _HANDED_OUT.add(port)
            return port


def wait_port(port, timeout=15):
    deadline = time.time() + timeout
    while time.time() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise SystemExit(f"load: nothing listens on {port} after {timeout}s")


def cpu_ticks(pids):
    """Clock ticks the processes spent in user space and in the kernel."""
    user = system = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            user += int(fields[11])  # utime
            system += int(fields[12])  # stime
        except (FileNotFoundError, ProcessLookupError, IndexError):
            pass
    return user, system


def rss_kib(pids):
    total = 0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except FileNotFoundError:
            pass
    return total


def children(pid):
    """`pid` and its descendants (nginx's workers)."""
    found = [pid]
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                ppid = int(proc.joinpath("stat").read_text().rsplit(")", 1)[1].split()[1])
            except (FileNotFoundError, IndexError, ValueError):
                continue
            if ppid == pid:
                found.extend(children(int(proc.name)))
    return found


class Target:
    """A process (or process tree) serving HTTP on a port."""

    def __init__(self, name, argv, port, cpu, env=None, log=None):
        self.name, self.port = name, port
        prefix = ["taskset", "-c", str(cpu)] if cpu is not None else []
        out = open(log, "wb") if log else subprocess.DEVNULL
        self.proc = subprocess.Popen(prefix + argv, stdout=out, stderr=subprocess.STDOUT,
                                     env=dict(os.environ, **(env or {})), start_new_session=True)
        wait_port(port)
        time.sleep(0.2)

    def pids(self):
        return children(self.proc.pid)

    def stop(self):
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=30)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            os.killpg(self.proc.pid, signal.SIGKILL)


WRK_LINE = re.compile(r"(\d+) requests in ([\d.]+)(\w+)")


def parse_latency(text, pct):
    m = re.search(rf"^\s+{pct}%\s+([\d.]+)(us|ms|s)\s*$", text, re.M)
    if not m:
        return float("nan")
    value, unit = float(m.group(1)), m.group(2)
    return value / 1000 if unit == "us" else value * 1000 if unit == "s" else value


def run_wrk(args, url, conns, seconds, pids, script=None, pin=True):
    before = cpu_ticks(pids)
    cmd = (["taskset", "-c", "0"] if pin else []) + [
        "wrk", "-t1", f"-c{conns}", f"-d{seconds}s", "--latency", "--timeout", "5s"]
    if script:
        cmd += ["-s", script]
    cmd.append(url)
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    after = cpu_ticks(pids)
    m = WRK_LINE.search(out)
    requests = int(m.group(1)) if m else 0
    errors = 0
    for pattern in (r"Non-2xx or 3xx responses: (\d+)", r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)"):
        e = re.search(pattern, out)
        if e:
            errors += sum(int(g) for g in e.groups())
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    def per_request(ticks):
        return ticks / CLK_TCK * 1e6 / max(requests, 1)

    user_us, system_us = per_request(after[0] - before[0]), per_request(after[1] - before[1])
    return {"rps": rps, "cpu_us": user_us + system_us, "user_us": user_us, "system_us": system_us,
            "p50": parse_latency(out, 50), "p99": parse_latency(out, 99), "requests": requests, "errors": errors}


def median(rows, key):
    values = [r[key] for r in rows if r[key] == r[key]]  # drop NaN
    return statistics.median(values) if values else float("nan")


def nginx_conf(work, name, port, body, upstream_port=None, access_log=False):
    """An nginx with one worker: the upstream (answers `body`) or a proxy to it."""
    root = work / name
    (root / "logs").mkdir(parents=True, exist_ok=True)
    if upstream_port is None:
        token = json.dumps({"token_type": "Bearer", "expires_in": 86400, "access_token": TOKEN})
        server = f"""
        location = /api/oauth/token {{ default_type application/json; return 200 '{token}'; }}
        location / {{ default_type application/json; return 200 '{body}'; }}"""
        upstream = ""
    else:
        upstream = f"upstream tallyfy {{ server 127.0.0.1:{upstream_port}; keepalive 64; }}"
        server = f"""
        location / {{
            proxy_pass http://tallyfy;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host 127.0.0.1:{upstream_port};
            proxy_set_header Authorization "Bearer {TOKEN}";
            proxy_set_header X-Tallyfy-Client APIClient;
            proxy_set_header Cookie "";
        }}"""
    log = f"access_log {root}/logs/access.log;" if access_log else "access_log off;"
    conf = f"""
worker_processes 1;
pid {root}/nginx.pid;
error_log {root}/logs/error.log warn;
events {{ worker_connections 4096; }}
http {{
    {log}
    keepalive_requests 1000000;
    keepalive_timeout 300s;
    client_body_temp_path {root}/body;
    proxy_temp_path {root}/proxy;
    {upstream}
    server {{
        listen 127.0.0.1:{port} reuseport;
        {server}
    }}
}}
"""
    path = root / "nginx.conf"
    path.write_text(conf)
    return ["nginx", "-p", str(root), "-c", str(path), "-g", "daemon off;"]


def haproxy_conf(work, port, upstream_port):
    conf = f"""
global
    nbthread 1
    maxconn 8192
defaults
    mode http
    timeout connect 2s
    timeout client 300s
    timeout server 300s
    http-reuse always
frontend proxy
    bind 127.0.0.1:{port}
    http-request del-header Cookie
    http-request set-header Authorization "Bearer {TOKEN}"
    http-request set-header X-Tallyfy-Client APIClient
    http-request set-header Host 127.0.0.1:{upstream_port}
    default_backend tallyfy
backend tallyfy
    server upstream 127.0.0.1:{upstream_port}
"""
    path = work / "haproxy.cfg"
    path.write_text(conf)
    return ["haproxy", "-f", str(path), "-db"]


def proxy_conf(work, name, port, admin, upstream_port, oauth=False, level="info", redis_port=None):
    credential = (
        f'kind = "client_credentials"\nclient_id = "1"\nclient_secret = {{ file = "secret" }}'
        if oauth else 'kind = "personal_token"\ntoken = { file = "token" }'
    )
    (work / "token").write_text(TOKEN)
    (work / "secret").write_text("load-test-secret")
    text = f"""
[listen]
proxy = "127.0.0.1:{port}"
admin = "127.0.0.1:{admin}"
[upstream]
base_url = "http://127.0.0.1:{upstream_port}"
[log]
level = "{level}"
[[credentials]]
name = "tallyfy"
{credential}
[[identities]]
name = "app"
credential = "tallyfy"
match = {{ any = true }}
"""
    if redis_port:
        # Fleet mode, with a budget every request spends in Redis (never reached).
        (work / "fleet-key").write_text("BwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwc=")
        text += f"""rate_limit = {{ per_second = 1000000, burst = 1000000 }}
[fleet]
redis_url = "redis://127.0.0.1:{redis_port}/"
key_prefix = "load"
encryption_key = {{ file = "fleet-key" }}
"""
    path = work / f"{name}.toml"
    path.write_text(text)
    return path


def wait_ready(admin, timeout=15):
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{admin}/readyz", timeout=1) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.05)
    raise SystemExit("load: tallyfy-proxy did not become ready")


def table(title, header, rows):
    print(f"\n### {title}\n")
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join("---" for _ in header) + "|")
    for row in rows:
        print("| " + " | ".join(row) + " |")


def fmt(value, digits=1):
    return "—" if value != value else f"{value:.{digits}f}"


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--proxy", required=True)
    parser.add_argument("--floor", default="")
    parser.add_argument("--floors", default="", help="the perf/floors binary: three more measuring sticks")
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--smoke", action="store_true", help="one 1-second round per target")
    parser.add_argument("--flat-minutes", type=float, default=0)
    parser.add_argument("--redis", default="", help="redis-server binary, for the fleet-mode row")
    parser.add_argument("--baseline", default="",
                        help="another tallyfy-proxy binary (say, an earlier build), a row of its own in the same run")
    args = parser.parse_args()
    if args.smoke:
        args.seconds, args.rounds = 1, 1
    cpus = os.cpu_count() or 1
    pin = cpus >= 2
    proxy_cpu = 1 if pin else None
    side_cpu = 0 if pin else None
    work = Path(tempfile.mkdtemp(prefix="tallyfy-load-"))
    print(f"load: {cpus} CPUs; " + ("wrk and the upstream pinned to CPU 0, each proxy to CPU 1"
                                     if pin else "fewer than 2 CPUs: nothing is pinned"))
    print(f"load: {args.rounds} round(s) of {args.seconds} s per target; work dir {work}")

    body = page_700_bytes()
    post = work / "post.lua"
    post.write_text("wrk.method = \"POST\"\nwrk.headers[\"Content-Type\"] = \"application/json\"\n"
                    f"wrk.body = {json.dumps(post_body_2k())}\n")
    targets = []

    def start(name, argv, port, cpu=proxy_cpu, **kw):
        t = Target(name, argv, port, cpu, **kw)
        targets.append(t)
        return t

    try:
        up_port = free_port()
        upstream = start("upstream", nginx_conf(work, "upstream", up_port, body), up_port, cpu=side_cpu)
        ports = {k: free_port() for k in ["nginx", "nginx_nolog", "haproxy", "floor", *FLOORS, "tp", "tp_nolog", "tp_oauth",
                                          "tp_multi", "tp_fleet", "tp_base", "redis"]}
        admins = {k: free_port() for k in ["tp", "tp_nolog", "tp_oauth", "tp_multi", "tp_fleet", "tp_base"]}
        redis = None
        if args.redis:
            redis = start("redis", [args.redis, "--bind", "127.0.0.1", "--port", str(ports["redis"]), "--save", "",
                                    "--appendonly", "no", "--dir", str(work)], ports["redis"], cpu=side_cpu)
        nginx = start("nginx", nginx_conf(work, "nginx", ports["nginx"], body, up_port, access_log=True), ports["nginx"])
        nginx_nolog = start("nginx (logs off)", nginx_conf(work, "nginx_nolog", ports["nginx_nolog"], body, up_port),
                            ports["nginx_nolog"])
        haproxy = start("HAProxy", haproxy_conf(work, ports["haproxy"], up_port), ports["haproxy"])
        floor = None
        if args.floor:
            floor = start("hyper-floor", [args.floor, f"127.0.0.1:{ports['floor']}", f"127.0.0.1:{up_port}", "current"],
                          ports["floor"])
        floors = [start(name, [args.floors, mode, f"127.0.0.1:{ports[mode]}", f"127.0.0.1:{up_port}"], ports[mode])
                  for mode, name in FLOORS.items()] if args.floors else []

        def tallyfy(key, name, cpu=proxy_cpu, binary=None, **conf):
            path = proxy_conf(work, key, ports[key], admins[key], up_port, **conf)
            argv = [binary or args.proxy, "run", "--config", str(path)]
            t = start(name, argv, ports[key], cpu=cpu, log=work / f"{key}.log")
            wait_ready(admins[key])
            return t

        tp = tallyfy("tp", "tallyfy-proxy")
        tp_nolog = tallyfy("tp_nolog", "tallyfy-proxy (logs off)", level="warn")
        tp_oauth = tallyfy("tp_oauth", "tallyfy-proxy, OAuth credential", oauth=True)
        tp_multi = tallyfy("tp_multi", "tallyfy-proxy, 2 threads unpinned", cpu=None)
        tp_fleet = tallyfy("tp_fleet", "tallyfy-proxy, fleet mode, budget in Redis",
                           redis_port=ports["redis"]) if redis else None
        tp_base = tallyfy("tp_base", "tallyfy-proxy, baseline build",
                          binary=args.baseline) if args.baseline else None

        def url(t):
            return f"http://127.0.0.1:{t.port}{PATH}"

        # Warm every target (connection pools, caches), untimed.
        for t in targets[1:]:
            if t is not redis:
                run_wrk(args, url(t), 16, 1, t.pids(), pin=pin)

        main_targets = [t for t in [nginx, nginx_nolog, haproxy, floor, *floors, tp, tp_nolog, tp_base] if t]
        extra = [t for t in [tp_oauth, tp_fleet] if t]
        results = {t.name: [] for t in main_targets + extra + [tp_multi]}
        single = [("direct", upstream), ("nginx", nginx)] + ([("hyper-floor", floor)] if floor else []) + [
            ("tallyfy-proxy", tp)]
        post_results, one_conn = [], {name: [] for name, _ in single}
        for round_ in range(args.rounds):
            order = main_targets[round_ % len(main_targets):] + main_targets[:round_ % len(main_targets)]
            for t in order + extra:
                results[t.name].append(run_wrk(args, url(t), 64, args.seconds, t.pids(), pin=pin))
            results[tp_multi.name].append(run_wrk(args, url(tp_multi), 64, args.seconds, tp_multi.pids(), pin=False))
            post_results.append(run_wrk(args, url(tp), 64, args.seconds, tp.pids(), script=str(post), pin=pin))
            for name, t in single[round_ % len(single):] + single[:round_ % len(single)]:
                one_conn[name].append(run_wrk(args, url(t), 1, args.seconds, t.pids(), pin=pin))

        errors = sum(r["errors"] for rows in results.values() for r in rows) + sum(r["errors"] for r in post_results)
        base = results[nginx.name]
        base_cpu, base_p99, base_rps = median(base, "cpu_us"), median(base, "p99"), median(base, "rps")
        rows = []
        for t in main_targets + extra + [tp_multi]:
            rs = results[t.name]
            cpu, rps, p99 = median(rs, "cpu_us"), median(rs, "rps"), median(rs, "p99")
            split = f"{fmt(median(rs, 'user_us'))} + {fmt(median(rs, 'system_us'))}"
            rows.append([t.name, fmt(cpu), split, f"{cpu / base_cpu:.2f}×", f"{rps / 1000:.1f}k",
                         f"{rps / base_rps:.2f}×", fmt(p99, 2), f"{p99 / base_p99:.2f}×"])
        table(f"GET {PATH} (700-byte JSON), wrk -t1 -c64, median of {args.rounds} × {args.seconds} s",
              ["target", "CPU µs / request", "user + kernel", "vs nginx", "req/s", "vs nginx", "p99 ms", "vs nginx"],
              rows)

        tp_cpu = median(results[tp.name], "cpu_us")
        post_cpu = median(post_results, "cpu_us")
        oauth_cpu = median(results[tp_oauth.name], "cpu_us")
        multi_cpu = median(results[tp_multi.name], "cpu_us")
        table("tallyfy-proxy ratios (CPU per request)", ["comparison", "ratio", "aim"], [
            ["OAuth credential (kept for replay) / personal token", f"{oauth_cpu / tp_cpu:.2f}", "≤ 1.10"],
            ["POST 2 KiB JSON with 3 dates / GET", f"{post_cpu / tp_cpu:.2f}", "≤ 1.30"],
            ["2 threads on 2 cores, unpinned / 1 core", f"{multi_cpu / tp_cpu:.2f}", "≤ 1.10"],
        ] + ([["fleet mode, a budget spent in Redis per request / alone (the proxy's CPU; Redis's not counted)",
               f"{median(results[tp_fleet.name], 'cpu_us') / tp_cpu:.2f}", "—"],
              ["fleet mode p99 / alone", f"{median(results[tp_fleet.name], 'p99') / median(results[tp.name], 'p99'):.2f}",
               "—"]] if tp_fleet else []))
        direct = median(one_conn["direct"], "p50")
        table("One connection (wrk -t1 -c1): p50 latency", ["target", "p50 ms", "added to direct"], [
            [name, fmt(median(rs, "p50"), 3), "—" if name == "direct" else f"{(median(rs, 'p50') - direct) * 1000:.0f} µs"]
            for name, rs in one_conn.items()
        ])

        # Memory: idle, 1,000 idle keep-alive connections, 1,000 under load.
        rows = []
        fresh = []
        for name in ["nginx", "hyper-floor", "tallyfy-proxy", "tallyfy-proxy, baseline build"]:
            if (name == "hyper-floor" and not args.floor) or (name.endswith("baseline build") and not args.baseline):
                continue
            t = fresh_target(args, work, name, up_port, body, proxy_cpu)
            fresh.append(t)
            idle = rss_kib(t.pids())
            kept = run_idle_connections(t)
            loaded = run_memory(args, t, url(t), pin)
            rows.append([name, fmt(idle / 1024), fmt(kept / 1024), fmt(loaded / 1024)])
            t.stop()
        table("Memory (RSS, MiB): idle; 1,000 keep-alive connections open (one request each, in turn); wrk -c1000",
              ["target", "idle", "1,000 kept alive", "1,000 under load"], rows)
        if args.flat_minutes > 0:
            early, late = run_flat(args, tp, url(tp), pin)
            table("tallyfy-proxy memory under steady load (RSS, MiB)", ["after 30 s", f"after {args.flat_minutes:g} min", "change"],
                  [[fmt(early / 1024), fmt(late / 1024), f"{(late - early) / early * 100:+.1f} %"]])
        print(f"\nload: {errors} failed requests in the timed runs")
        if errors:
            for t in targets:
                if t.name.startswith("tallyfy"):
                    print(f"load: see {work}/*.log")
            sys.exit(1)
    finally:
        for t in reversed(targets):
            t.stop()
    shutil.rmtree(work, ignore_errors=True)


# perf/floors: the least a proxy shaped like tallyfy-proxy (hyper's server, a
# current-thread runtime, upstream connections kept per thread) could cost.
FLOORS = {
    "hyper-pooled": "floor: hyper server, hyper client conns pooled per thread",
    "hand-client": "floor: hyper server, upstream exchange by hand",
    "hand-both": "floor: no hyper",
}


def fresh_target(args, work, name, up_port, body, cpu):
    """A newly started target, for memory figures that must not carry earlier runs."""
    port = free_port()
    if name == "nginx":
        return Target(name, nginx_conf(work, f"mem_{port}", port, body, up_port, access_log=True), port, cpu)
    if name == "hyper-floor":
        return Target(name, [args.floor, f"127.0.0.1:{port}", f"127.0.0.1:{up_port}", "current"], port, cpu)
    admin = free_port()
    path = proxy_conf(work, f"mem_{port}", port, admin, up_port)
    binary = args.baseline if name.endswith("baseline build") else args.proxy
    t = Target(name, [binary, "run", "--config", str(path)], port, cpu, log=work / f"mem_{port}.log")
    wait_ready(admin)
    time.sleep(0.3)
    return t


def run_idle_connections(t, count=1000):
    """RSS with `count` keep-alive connections open, each after one request
    (made one after the other, so the upstream side stays one connection)."""
    request = f"GET {PATH} HTTP/1.1\r\nHost: a\r\n\r\n".encode()
    conns = []
    try:
        for _ in range(count):
            c = socket.create_connection(("127.0.0.1", t.port))
            c.sendall(request)
            data = b""
            while b"\r\n\r\n" not in data:
                chunk = c.recv(65536)
                if not chunk:
                    break
                data += chunk
            conns.append(c)
        time.sleep(0.5)
        return rss_kib(t.pids())
    finally:
        for c in conns:
            c.close()


def run_memory(args, t, url, pin):
    """RSS while wrk holds 1,000 keep-alive connections."""
    seconds = max(args.seconds, 3)
    cmd = (["taskset", "-c", "0"] if pin else []) + ["wrk", "-t1", "-c1000", f"-d{seconds}s", "--timeout", "5s", url]
    wrk = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    peak = 0
    deadline = time.time() + seconds
    while time.time() < deadline:
        time.sleep(0.25)
        peak = max(peak, rss_kib(t.pids()))
    wrk.wait()
    return peak


def run_flat(args, t, url, pin):
    """RSS after 30 s of load and at the end of `--flat-minutes`."""
    seconds = int(args.flat_minutes * 60)
    cmd = (["taskset", "-c", "0"] if pin else []) + ["wrk", "-t1", "-c64", f"-d{seconds}s", url]
    wrk = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(30)
    early = rss_kib(t.pids())
    wrk.wait()
    return early, rss_kib(t.pids())


if __name__ == "__main__":
    main()
