"""Hub revisions: resolved once to a commit, recorded, and kept by a resume."""

import json

import pytest

from harvest.config import CorpusSource


@pytest.fixture
def fake_hub(monkeypatch):
    """A loopback server answering the hub's dataset-info API: {repo: {revision: sha}}."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
    from urllib.parse import unquote

    commits = {"org/web": {"": "a" * 40, "main": "a" * 40, "v2": "b" * 40}}
    asked = []

    class Hub(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_GET(self):
            parts = unquote(self.path.split("?")[0]).split("/")  # /api/datasets/org/web[/revision/REV]
            repo, rev = "/".join(parts[3:5]), parts[6] if len(parts) > 6 else ""
            asked.append((repo, rev))
            sha = commits.get(repo, {}).get(rev)
            body = json.dumps({"id": repo, "sha": sha} if sha else {"error": "not found"}).encode()
            self.send_response(200 if sha else 404)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Hub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{server.server_address[1]}")
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    yield commits, asked
    server.shutdown()


def test_hub_revisions_resolve_once_then_resume_reuses_the_recorded_commit(tmp_path, fake_hub):
    import numpy as np
    import torch

    import cache_format as cf
    from cache_format.errors import UserError
    from harvest import revisions

    commits, asked = fake_hub
    local = CorpusSource("local", str(tmp_path / "a.txt"))
    hub = CorpusSource("web", "org/web")
    pins = revisions.pin([local, hub], [])
    assert pins == {1: {"requested": "", "commit": "a" * 40}} and asked == [("org/web", "")]
    # a segment records the pins; the upstream branch moves; a resume keeps the recorded commit
    w = cf.create_cache(str(tmp_path / "c"), d_model=4, layers=[0], meta={"model": {"name_or_path": "t"}})
    with w.segment(meta={"plan": {"next_seq": 1, "revisions": {"web": pins[1]}}}) as seg:
        seg.append(
            {0: torch.zeros(2, 4, dtype=torch.bfloat16)},
            tokens=np.zeros(2, np.int32),
            seq_ids=np.zeros(2, np.int64),
            positions=np.arange(2, dtype=np.int32),
        )
    commits["org/web"][""] = "c" * 40
    segs = cf.open_cache(str(tmp_path / "c")).segments
    assert revisions.pin([hub], segs)[0]["commit"] == "a" * 40 and len(asked) == 1
    assert revisions.pin([CorpusSource("web", "org/web", revision="a" * 40)], segs)[0]["commit"] == "a" * 40
    with pytest.raises(UserError, match="harvested at revision 'main'.*not 'v2'"):
        revisions.pin([CorpusSource("web", "org/web", revision="v2")], segs)
    assert revisions.pin([CorpusSource("web", "org/web", revision="v2")], [])[0]["commit"] == "b" * 40
    with pytest.raises(UserError, match="cannot resolve the revision 'nope'"):
        revisions.pin([CorpusSource("web", "org/web", revision="nope")], [])


def test_a_hub_supergpqa_is_pinned_to_its_commit_and_a_local_file_is_not(fake_hub, tmp_path):
    from harvest import revisions

    commits, asked = fake_hub
    commits["m-a-p/SuperGPQA"] = {"main": "d" * 40}
    pin = revisions.pin_dataset("m-a-p/SuperGPQA", "main", None)
    assert pin == {"requested": "main", "commit": "d" * 40} and asked[-1] == ("m-a-p/SuperGPQA", "main")
    commits["m-a-p/SuperGPQA"]["main"] = "e" * 40  # upstream moves: the cache's record wins
    assert revisions.pin_dataset("m-a-p/SuperGPQA", "main", pin)["commit"] == "d" * 40 and len(asked) == 1
    local = tmp_path / "q.jsonl"
    local.write_text("")
    assert (
        revisions.pin_dataset(str(local), "main", None) is None
        and revisions.pin_dataset("builtin:tiny", "", None) is None
    )
