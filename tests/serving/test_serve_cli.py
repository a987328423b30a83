"""`fast3d serve` as a user runs it: the loopback rule, the API key, and SIGTERM draining the
requests in flight before the process exits 0."""

import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error

import pytest
import torch

from fast3d.cli import main
from fast3d.models.lgm import LGM, LGMConfig
from fast3d.serving.loadtest import multipart, post


def _get(url: str, headers: dict) -> str:
    import urllib.request

    with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=30) as r:
        return r.read().decode()


def test_serve_refuses_other_interfaces_without_a_key(tmp_path, capsys):
    assert main(["serve", "--checkpoint", str(tmp_path), "--host", "0.0.0.0"]) == 2
    assert "needs --api-key-file" in capsys.readouterr().err
    short = tmp_path / "key"
    short.write_text("abc\n")
    assert main(["serve", "--checkpoint", str(tmp_path), "--host", "0.0.0.0", "--api-key-file", str(short)]) == 2
    assert "at least 16 characters" in capsys.readouterr().err
    assert main(["serve", "--checkpoint", str(tmp_path / "none")]) == 2


@pytest.mark.slow
def test_serve_needs_the_key_and_drains_on_sigterm(tmp_path, gen):
    import io

    from PIL import Image

    torch.manual_seed(0)
    LGM(LGMConfig.preset("tiny")).save_pretrained(str(tmp_path / "lgm"))
    key = "k" * 8 + "0123456789abcdef"
    (tmp_path / "key").write_text(key + "\n")
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "PYTHONUNBUFFERED": "1"}
    log = tmp_path / "serve.log"  # a file, not a pipe: nothing has to keep reading Ray's output
    with open(log, "w") as f:
        proc = subprocess.Popen([sys.executable, "-m", "fast3d.cli", "serve", "--checkpoint", str(tmp_path / "lgm"),
                                 "--host", "0.0.0.0", "--port", str(port), "--api-key-file", str(tmp_path / "key"),
                                 "--max-batch", "2", "--max-wait-ms", "20"],
                                stdout=f, stderr=subprocess.DEVNULL, text=True, env=env)
    try:
        t0 = time.monotonic()
        while "ready on" not in log.read_text():
            assert proc.poll() is None and time.monotonic() - t0 < 300, log.read_text()[-3000:]
            time.sleep(0.5)
        views = []
        for _ in range(4):
            buf = io.BytesIO()
            Image.fromarray((torch.rand(64, 64, 3, generator=gen) * 255).to(torch.uint8).numpy()).save(buf, "PNG")
            views.append(buf.getvalue())
        body, ctype = multipart(views)
        url = f"http://127.0.0.1:{port}/v1/reconstruct"
        status, headers, answer = post(url, body, {"Content-Type": ctype})
        assert status == 401 and json.loads(answer)["error"]["field"] == "authorization"
        assert headers.get("www-authenticate") == "Bearer"
        assert post(url, body, {"Content-Type": ctype, "Authorization": "Bearer " + "x" * len(key)})[0] == 401
        # without the key: the metrics are refused; the API's description (routes only) is public
        with pytest.raises(urllib.error.HTTPError, match="401"):
            _get(f"http://127.0.0.1:{port}/metrics", {})
        assert "/v1/reconstruct" in json.loads(_get(f"http://127.0.0.1:{port}/openapi.json", {}))["paths"]
        auth = {"Content-Type": ctype, "Authorization": f"Bearer {key}"}
        status, _, ref = post(url, body, auth)
        assert status == 200
        results = []
        threads = [threading.Thread(target=lambda: results.append(post(url, body, auth))) for _ in range(3)]
        for t in threads:
            t.start()
        # SIGTERM only once the server holds a request: what it drains is then shown, not assumed.
        metrics = f"http://127.0.0.1:{port}/metrics"
        while not any(line.startswith("fast3d_in_flight") and float(line.split()[-1]) >= 1
                      for line in _get(metrics, auth).splitlines()):
            assert time.monotonic() - t0 < 600 and not results, "no request was ever in flight"
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        for t in threads:
            t.join(timeout=120)
        assert [r[0] for r in results] == [200] * 3 and all(r[2] == ref for r in results)
        assert proc.wait(timeout=120) == 0
        rest = log.read_text()
        assert "draining" in rest and "stopped" in rest
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
