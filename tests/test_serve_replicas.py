"""Scaling out: two `bitcompile serve` replicas behind nginx (Debian's package; .ci/run installs it),
all on loopback. Requests spread over both; when one replica dies, requests that had not reached it
go to the other, and the ones it held end with an error the client sees, never a hang."""

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest
from conftest import require

import bitcompile
from bitcompile.tools.bench_http import free_port, wait_healthy

NGINX_CONF = """daemon off;
worker_processes 1;
pid {tmp}/nginx.pid;
error_log {tmp}/error.log;
events {{ worker_connections 256; }}
http {{
    access_log {tmp}/access.log;
    client_body_temp_path {tmp}/body; proxy_temp_path {tmp}/proxy; fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi; scgi_temp_path {tmp}/scgi;
    upstream bitcompile {{
        server 127.0.0.1:{a} max_fails=1 fail_timeout=30s;
        server 127.0.0.1:{b} max_fails=1 fail_timeout=30s;
    }}
    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://bitcompile;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;
            proxy_connect_timeout 2s;
            proxy_read_timeout 60s;
        }}
    }}
}}
"""


def served_200(url: str) -> float:
    for line in httpx.get(url + "/metrics").text.splitlines():
        if line.startswith('bitcompile_requests_total{endpoint="/v1/completions",status="200"}'):
            return float(line.split()[-1])
    return 0.0


@pytest.fixture
def replicas(artifacts, tmp_path):
    nginx = shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").is_file() else None)
    require(nginx is not None, "nginx is not installed (apt-get install nginx)")
    ports = [free_port(), free_port()]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    servers = [subprocess.Popen([sys.executable, "-m", "bitcompile.cli", "serve", str(artifacts["autobitlinear"]),
                                 "--port", str(p), "--max-batch", "4", "--model-name", "tiny"],
                                env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE) for p in ports]
    port = free_port()
    (tmp_path / "nginx.conf").write_text(NGINX_CONF.format(tmp=tmp_path, a=ports[0], b=ports[1], port=port))
    balancer = None
    try:
        for p, process in zip(ports, servers):
            wait_healthy(f"http://127.0.0.1:{p}", process)  # readiness before traffic
        balancer = subprocess.Popen([nginx, "-c", str(tmp_path / "nginx.conf"), "-p", str(tmp_path)],
                                    stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        wait_healthy(f"http://127.0.0.1:{port}", balancer)
        yield f"http://127.0.0.1:{port}", [f"http://127.0.0.1:{p}" for p in ports], servers
    finally:
        for process in servers + ([balancer] if balancer else []):
            if process.poll() is None:
                process.send_signal(signal.SIGCONT)
                process.kill()
            process.wait(timeout=30)


def test_two_replicas_behind_nginx_share_requests_and_survive_one_dying(replicas, artifacts):
    front, backends, servers = replicas
    client = openai.OpenAI(base_url=front + "/v1", api_key="none", max_retries=0, timeout=60)
    engine = bitcompile.load(artifacts["autobitlinear"])
    prompts = [f"replica {i}" for i in range(8)]
    want = {p: engine.generate(p, max_new_tokens=6, temperature=0) for p in prompts}

    for p in prompts:  # spread over both, each answer the same as the engine's
        assert client.completions.create(model="tiny", prompt=p, max_tokens=6, temperature=0).choices[0].text == want[p]
    assert all(served_200(url) >= 2 for url in backends), [served_200(url) for url in backends]

    # replica 0 stops answering (SIGSTOP: its socket still accepts) with requests on their way to it
    servers[0].send_signal(signal.SIGSTOP)
    outcomes = {}

    def ask(p):
        try:
            outcomes[p] = client.completions.create(model="tiny", prompt=p, max_tokens=6, temperature=0).choices[0].text
        except openai.APIError as e:
            outcomes[p] = e

    threads = [threading.Thread(target=ask, args=(p,)) for p in prompts[:4]]
    for t in threads:
        t.start()
    time.sleep(1.0)  # they are in flight: half of them held by the stopped replica
    servers[0].kill()
    for t in threads:
        t.join(timeout=60)
    assert not any(t.is_alive() for t in threads), "a request hung"
    failed = [p for p, o in outcomes.items() if isinstance(o, Exception)]
    assert failed, "no request was held by the dead replica"
    assert all(outcomes[p] == want[p] for p in outcomes if p not in failed)
    assert all(isinstance(outcomes[p], openai.APIStatusError) and outcomes[p].status_code == 502 for p in failed)

    # requests that start now all go to the living replica
    for p in prompts:
        assert client.completions.create(model="tiny", prompt=p, max_tokens=6, temperature=0).choices[0].text == want[p]
