"""Hub names without a network: one quick check, offline mode, one line, no run folder left behind.

"No network" is made deterministic by pointing HF_ENDPOINT at a local port nothing listens on.
"""

import http.server
import os
import socket
import subprocess
import sys
import threading

import pytest

from fatrain import hub


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_cached_tokenizer(hf_home, repo_id: str) -> None:
    """A small tokenizer.json laid out as huggingface_hub's cache keeps a downloaded one."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {c: i for i, c in enumerate("abcdefghijklmnopqrstuvwxyz .,\n")}
    vocab["[UNK]"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    tok.add_special_tokens(["<|endoftext|>"])
    repo = hf_home / "hub" / f"models--{repo_id.replace('/', '--')}"
    commit = "0123456789abcdef0123456789abcdef01234567"
    (repo / "snapshots" / commit).mkdir(parents=True)
    (repo / "refs").mkdir()
    tok.save(str(repo / "snapshots" / commit / "tokenizer.json"))
    (repo / "refs" / "main").write_text(commit)


@pytest.fixture
def fresh_hub_state(monkeypatch):
    """hub's per-process memory and the libraries' offline flags, restored after the test."""
    monkeypatch.setattr(hub, "_unreachable", {})
    monkeypatch.setattr(hub, "_switched_offline", None)
    for variable in hub.OFFLINE_VARIABLES:
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")  # so the value enter_offline_mode writes is undone
    for module, names in (("huggingface_hub.constants", ["HF_HUB_OFFLINE"]),
                          ("datasets.config", ["HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"])):
        if module in sys.modules:
            for name in names:
                monkeypatch.setattr(sys.modules[module], name, getattr(sys.modules[module], name))
    return monkeypatch


def test_unreachable_hub_switches_offline_once(fresh_hub_state):
    endpoint = f"http://127.0.0.1:{closed_port()}"
    fresh_hub_state.setenv("HF_ENDPOINT", endpoint)
    reason = hub.offline_reason()
    assert reason.startswith("the Hugging Face Hub cannot be reached") and endpoint in reason
    assert os.environ["HF_HUB_OFFLINE"] == "1"
    if "huggingface_hub.constants" in sys.modules:
        assert sys.modules["huggingface_hub.constants"].HF_HUB_OFFLINE is True
    # Asked again, the answer is remembered (no second request) and still names the Hub, not the variable.
    fresh_hub_state.setattr(hub, "_probe", lambda url, timeout: pytest.fail("probed twice"))
    assert hub.offline_reason() == reason


def test_offline_variable_means_no_request(fresh_hub_state):
    fresh_hub_state.setenv("HF_DATASETS_OFFLINE", "1")
    fresh_hub_state.setattr(hub, "_probe", lambda url, timeout: pytest.fail("the Hub was asked"))
    assert hub.offline_reason() == "HF_DATASETS_OFFLINE=1 is set, so the Hub is not asked"


def test_any_http_answer_is_a_reachable_hub(fresh_hub_state):
    class NotFound(http.server.BaseHTTPRequestHandler):
        def do_HEAD(self):
            self.send_error(404)

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), NotFound)
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    try:
        fresh_hub_state.setenv("HF_ENDPOINT", f"http://127.0.0.1:{server.server_port}")
        assert hub.offline_reason() is None
        assert os.environ["HF_HUB_OFFLINE"] == "0"
    finally:
        server.shutdown()
        server.server_close()


def test_train_without_network_fails_at_once_with_one_line(tmp_path):
    """fatrain-train with Hub names and no network: exit 2, one line, no retries, no run folder.

    A tokenizer that is not cached is named; one that is cached loads offline, and then the
    dataset that is not cached is named. Both runs go at once (each is mostly start-up).
    """
    hf_home = tmp_path / "hf"
    write_cached_tokenizer(hf_home, "cached/tok")
    env = {k: v for k, v in os.environ.items() if k not in hub.OFFLINE_VARIABLES}
    env.update(HF_ENDPOINT=f"http://127.0.0.1:{closed_port()}", HF_HOME=str(hf_home), FATRAIN_PROGRESS="0",
               FATRAIN_CACHE=str(tmp_path / "cache"))
    cases = {"gpt2": ("data.tokenizer='gpt2': the tokenizer gpt2 is not in the local cache",
                      "`hf download gpt2 tokenizer.json`"),
             "cached/tok": ("data.hf_name='roneneldan/TinyStories': the dataset roneneldan/TinyStories is not "
                            "in the local cache", "datasets.load_dataset('roneneldan/TinyStories', split='train')")}
    procs = {}
    for tokenizer in cases:
        cwd = tmp_path / tokenizer.replace("/", "_")
        cwd.mkdir()
        command = [sys.executable, "-m", "fatrain.cli.train", "data=hf", "data.hf_name=roneneldan/TinyStories",
                   f"data.tokenizer={tokenizer}", "logger.wandb.mode=disabled"]
        procs[tokenizer] = (cwd, subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.PIPE,
                                                  stderr=subprocess.PIPE, text=True))
    for tokenizer, (cwd, proc) in procs.items():
        stdout, stderr = proc.communicate(timeout=120)
        lines = [line for line in (stdout + stderr).splitlines() if line.strip()]
        assert proc.returncode == 2, stderr
        assert len(lines) == 1, lines
        what, download = cases[tokenizer]
        assert lines[0].startswith(f"error: {what}")
        assert "the Hugging Face Hub cannot be reached" in lines[0] and env["HF_ENDPOINT"] in lines[0]
        assert download in lines[0] and "HF_HUB_OFFLINE=1" in lines[0]
        # Hydra's default run folder (outputs/train/<time>) was made for the run and removed again.
        left = [os.path.join(root, d) for root, dirs, _ in os.walk(cwd / "outputs") for d in dirs
                if root != str(cwd / "outputs")]
        assert left == []
