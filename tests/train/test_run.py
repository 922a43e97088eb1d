"""`train run` end to end on caches written through the public API (CliRunner and subprocesses)."""

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from planted_data import write_planted
from safetensors.torch import load_file

from cache_format.errors import UserError
from train.cli import cli

ROOT = Path(__file__).resolve().parents[2]
FAST = [
    "--profile",
    "tiny",
    "--set",
    "train.d_sae=192",
    "--set",
    "train.k=3",
    "--set",
    "train.k_aux=16",
    "--set",
    "train.batch_size=256",
    "--set",
    "train.lr=0.004",
    "--set",
    "train.lr_min=0.0004",
    "--set",
    "train.dead_tokens=20000",
    "--set",
    "train.shuffle_buffer_tokens=4096",
    "--set",
    "train.geometric_median_samples=1024",
    "--set",
    "train.eval_tokens=2048",
]


# 20 epochs of the 16k-row planted cache: AuxK normalized by the residual's variance recovers
# every feature here (two seeds measured); sparsify's total-variance normalization gets 97.9%
PLANTED = [
    "--set",
    "train.training_tokens=320000",
    "--set",
    "train.eval_every_tokens=80000",
    "--set",
    "train.checkpoint_every_tokens=160000",
    "--set",
    "train.sweep=[{d_sae=128, k=4}]",
    "--set",
    "train.heldout_fraction=0.1",
]  # the planted set's own split, not the demo profile's


def run(args):
    return CliRunner().invoke(cli, ["run", "--no-progress", *args], catch_exceptions=True)


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    url = str(tmp_path_factory.mktemp("planted") / "cache")
    dicts, _ = write_planted(url, layers=(2, 4))
    return url, dicts


def recovered(sae_dir: Path, dic: np.ndarray) -> np.ndarray:
    w = load_file(str(sae_dir / "sae_weights.safetensors"))["W_dec"]
    w = w / w.norm(dim=1, keepdim=True)
    return (torch.tensor(dic, dtype=torch.float32) @ w.T).max(dim=1).values.numpy()


@pytest.mark.slow
def test_planted_features_are_recovered_and_exported(planted, tmp_path):
    url, dicts = planted
    out = tmp_path / "out"
    r = run([*FAST, "--cache", url, "--out", str(out), *PLANTED])
    assert r.exit_code == 0, r.output + repr(r.exception)
    run_json = json.loads((out / "run.json").read_text())
    names = {s["name"] for s in run_json["saes"]}
    assert names == {"L2_n192_k3", "L2_n128_k4", "L4_n192_k3", "L4_n128_k4"}  # layers x settings, one pass
    for layer in (2, 4):
        cos = recovered(out / f"L{layer}_n192_k3", dicts[layer])
        assert (cos > 0.9).mean() >= 0.99, np.sort(cos)[:10]
        entry = next(s for s in run_json["saes"] if s["name"] == f"L{layer}_n192_k3")
        assert entry["metrics"]["variance_explained"] >= 0.92 and entry["metrics"]["l0"] <= 3
        cfg = json.loads((out / entry["path"] / "cfg.json").read_text())
        assert cfg["d_in"] == 32 and cfg["d_sae"] == 192 and cfg["k"] == 3 and cfg["layer"] == layer
        assert cfg["layer_fingerprint"] == run_json["layer_fingerprints"][str(layer)]
        assert cfg["split"]["fraction"] == 0.1 and cfg["tokens_seen"] >= 320000
        assert cfg["metadata"]["prepend_bos"] is False and cfg["cache"] == str(Path(url).resolve())
        pt = torch.load(out / entry["path"] / f"sae_L{layer}_n192_k3.pt", weights_only=True)
        assert pt["W_enc"].shape == (32, 192) and pt["W_dec"].shape == (192, 32)
        traj = [json.loads(x) for x in (out / entry["trajectory"]).read_text().splitlines()]
        assert [t["tokens"] for t in traj] == sorted(t["tokens"] for t in traj) and len(traj) >= 4
        assert {"variance_explained", "mse", "l0", "dead_fraction", "alive", "train_dead_fraction"} <= set(traj[-1])
        assert (out / entry["path"] / "trajectory.png").stat().st_size > 1000
    # the SAE applies to raw residuals as exported (through train.sae)
    from train.sae import TopKSAE

    sae = TopKSAE(32, 192, 3)
    sae.load_state_dict(
        {k: v for k, v in load_file(str(out / "L2_n192_k3/sae_weights.safetensors")).items()}, strict=False
    )

    # re-running the finished command says so and exits 0
    r2 = run([*FAST, "--cache", url, "--out", str(out), *PLANTED])
    assert r2.exit_code == 0 and "already complete" in r2.output
    # another run into the same OUT is refused, unless --fresh
    r3 = run([*FAST, "--cache", url, "--out", str(out), "--set", "train.training_tokens=5120"])
    assert isinstance(r3.exception, UserError) and "--fresh" in str(r3.exception)
    r4 = run(
        [*FAST, "--cache", url, "--out", str(out), "--set", "train.training_tokens=5120", "--layers", "2", "--fresh"]
    )
    assert r4.exit_code == 0, repr(r4.exception)
    assert [s["name"] for s in json.loads((out / "run.json").read_text())["saes"]] == ["L2_n192_k3"]
    assert not (out / "L4_n192_k3").exists()


@pytest.mark.parametrize(
    "args,message",
    [
        (["--cache", "{missing}"], "is not a cache"),
        (["--cache", "{planted}", "--layers", "9"], "not in the cache"),
        (["--cache", "{planted}", "--set", "train.k=192"], "k=192 must be between"),
        (["--cache", "{planted}", "--set", "train.batch_size=1000000"], "larger than"),
        (["--cache", "{planted}", "--set", "train.learning_rate=1"], "unknown key 'learning_rate'"),
        # the kinds' keys (docs/train.md: the kinds)
        (["--cache", "{planted}", "--set", 'train.architecture="gated"'], "architecture 'gated' is unknown"),
        (
            [
                "--cache",
                "{planted}",
                "--set",
                'train.architecture="matryoshka"',
                "--set",
                "train.matryoshka_sizes=[96, 48, 192]",
            ],
            "matryoshka_sizes=[96, 48, 192] must increase and end at d_sae=192",
        ),
        (
            ["--cache", "{planted}", "--set", 'train.sweep=[{architecture="matryoshka", matryoshka_sizes=[48, 96]}]'],
            "train.sweep[0].matryoshka_sizes=[48, 96] must increase and end at d_sae=192",
        ),
        (
            ["--cache", "{planted}", "--set", 'train.architecture="relu"', "--set", "train.sparsity_coefficient=-1"],
            "train.sparsity_coefficient = -1.0 must be at least 0",
        ),
        (
            ["--cache", "{planted}", "--set", 'train.sweep=[{architecture="jumprelu", jumprelu_bandwidth=-0.1}]'],
            "jumprelu_bandwidth = -0.1 must be above 0",
        ),
        (
            ["--cache", "{planted}", "--set", 'train.sweep=[{architecture="batchtopk", k=500}]'],
            "train.sweep[0].k=500 must be between 1 and d_sae-1",
        ),
        (
            ["--cache", "{planted}", "--set", "train.matryoshka_sizes=[96, 192]"],
            "train.matryoshka_sizes is not read by train.architecture='topk'",
        ),
        (
            ["--cache", "{planted}", "--set", 'train.sweep=[{architecture="relu", k=4}]'],
            "train.sweep[0]: k is not read by architecture 'relu'",
        ),
    ],
)
def test_one_line_user_errors(planted, tmp_path, args, message):
    url, _ = planted
    args = [a.replace("{missing}", str(tmp_path / "nope")).replace("{planted}", url) for a in args]
    r = run([*FAST, "--out", str(tmp_path / "o"), *args])
    assert isinstance(r.exception, UserError), repr(r.exception)
    assert message in str(r.exception) and "\n" not in str(r.exception)
    assert not (tmp_path / "o" / "run_state.json").exists()  # a refused run leaves OUT untouched


def cli_proc(args, **kw):
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    return subprocess.Popen(
        [sys.executable, "-m", "train", "run", "--no-progress", *args],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **kw,
    )


def test_error_is_one_line_on_stderr(tmp_path):
    p = cli_proc(["--profile", "tiny", "--cache", str(tmp_path / "nope"), "--out", str(tmp_path / "o")])
    out, err = p.communicate(timeout=120)
    assert p.returncode == 2 and err.strip().count("\n") == 0 and err.startswith("error: ") and "Traceback" not in err


# one SAE of every other kind beside the base TopK, trained from the same batches
KINDS_SWEEP = [
    "--set",
    'train.sweep=[{architecture="batchtopk"}, {architecture="matryoshka"}, '
    '{architecture="jumprelu", sparsity_coefficient=0.5}, {architecture="relu", sparsity_coefficient=0.5}]',
]
KIND_NAMES = [
    "L2_n192_k3",
    "L2_n192_batchtopk_k3",
    "L2_n192_matryoshka_k3",
    "L2_n192_jumprelu_c0.5",
    "L2_n192_relu_c0.5",
]


@pytest.mark.slow
def test_kill_9_at_a_random_moment_then_resume_gives_identical_weights(planted, tmp_path):
    """Every kind: the optimizer, BatchTopK's running threshold, JumpReLU's thresholds and the
    coefficient warmups all resume exactly."""
    url, _ = planted
    args = [
        *FAST,
        "--cache",
        url,
        "--layers",
        "2",
        "--set",
        "train.training_tokens=30720",
        "--set",
        "train.checkpoint_every_tokens=2560",
        "--set",
        "train.eval_every_tokens=10240",
        *KINDS_SWEEP,
    ]
    ref, resumed = tmp_path / "ref", tmp_path / "resumed"
    p = cli_proc([*args, "--out", str(ref)])
    assert p.wait(timeout=300) == 0, p.stderr.read()
    rng = random.Random()
    p = cli_proc([*args, "--out", str(resumed)])
    deadline = time.time() + 120
    while not list((resumed / "checkpoints").glob("tokens_*.json")) and time.time() < deadline and p.poll() is None:
        time.sleep(0.05)
    time.sleep(rng.random() * 0.2)  # a random moment after the first checkpoint, mid-run
    assert p.poll() is None, "the run finished before it could be killed"
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    p = cli_proc([*args, "--out", str(resumed)])
    out, err = p.communicate(timeout=300)
    assert p.returncode == 0, err
    assert "resuming" in err
    assert sorted(s["name"] for s in json.loads((ref / "run.json").read_text())["saes"]) == sorted(KIND_NAMES)
    for name in KIND_NAMES:
        a = load_file(str(ref / name / "sae_weights.safetensors"))
        b = load_file(str(resumed / name / "sae_weights.safetensors"))
        assert all(torch.equal(a[k], b[k]) for k in a), name
        ta = [json.loads(x) for x in (ref / name / "trajectory.jsonl").read_text().splitlines()]
        tb = [json.loads(x) for x in (resumed / name / "trajectory.jsonl").read_text().splitlines()]
        assert [t["variance_explained"] for t in ta] == [t["variance_explained"] for t in tb], name
        assert [t["l0"] for t in ta] == [t["l0"] for t in tb], name
    assert len(list((resumed / "checkpoints").glob("tokens_*.safetensors"))) <= 4  # last 2 + best 2


@pytest.mark.slow
def test_two_process_gloo_run_matches_one_process(planted, tmp_path):
    url, _ = planted
    args = [
        *FAST,
        "--cache",
        url,
        "--layers",
        "2",
        "--set",
        "train.training_tokens=12800",
        "--set",
        "train.checkpoint_every_tokens=6400",
        "--set",
        "train.eval_every_tokens=12800",
        *KINDS_SWEEP,
    ]
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")

    def ddp(out):
        p = subprocess.run(
            [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--standalone",
                "--nproc-per-node",
                "2",
                "-m",
                "train",
                "run",
                "--no-progress",
                *args,
                "--out",
                str(out),
            ],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert p.returncode == 0, p.stderr[-3000:]
        return p.stderr

    ddp(tmp_path / "ddp")
    single = cli_proc([*args, "--out", str(tmp_path / "one")])
    assert single.wait(timeout=300) == 0
    a = load_file(str(tmp_path / "ddp/L2_n192_k3/sae_weights.safetensors"))
    b = load_file(str(tmp_path / "one/L2_n192_k3/sae_weights.safetensors"))
    # each rank reads its own half of every window, so the global batches differ from one
    # process's (same windows, same mixing): the same features, learned as well
    cos = torch.nn.functional.cosine_similarity(a["W_dec"], b["W_dec"], dim=1)
    assert cos.mean() > 0.99
    from train.outdir import Checkpoints

    ckpts = sorted((tmp_path / "ddp/checkpoints").glob("tokens_*.safetensors"))
    ranks = Checkpoints.load(ckpts[0])["loader"]["ranks"]
    assert [r["rank"] for r in ranks] == [0, 1] and all(r["world_size"] == 2 for r in ranks)
    # a crash after the first checkpoint: both ranks resume from their own positions, exactly
    shutil.copytree(tmp_path / "ddp", tmp_path / "crashed")
    for f in [
        *sorted((tmp_path / "crashed/checkpoints").glob("tokens_*"))[2:],
        tmp_path / "crashed/run.json",
        *[tmp_path / "crashed" / name / "sae_weights.safetensors" for name in KIND_NAMES],
    ]:
        f.unlink()
    state = json.loads((tmp_path / "crashed/run_state.json").read_text())
    (tmp_path / "crashed/run_state.json").write_text(json.dumps(dict(state, complete=False)))
    assert "resuming" in ddp(tmp_path / "crashed")
    for name in KIND_NAMES:  # every kind resumes exactly under torchrun too
        a = load_file(str(tmp_path / "ddp" / name / "sae_weights.safetensors"))
        c = load_file(str(tmp_path / "crashed" / name / "sae_weights.safetensors"))
        assert all(torch.equal(a[k], c[k]) for k in a), name
    ra = {s["name"]: s["metrics"] for s in json.loads((tmp_path / "ddp/run.json").read_text())["saes"]}
    rb = {s["name"]: s["metrics"] for s in json.loads((tmp_path / "one/run.json").read_text())["saes"]}
    assert abs(ra["L2_n192_k3"]["variance_explained"] - rb["L2_n192_k3"]["variance_explained"]) < 0.01
    for name in KIND_NAMES:  # two ranks learn every kind about as well as one process
        assert abs(ra[name]["variance_explained"] - rb[name]["variance_explained"]) < 0.05, (name, ra[name], rb[name])


def test_import_train_pulls_in_neither_transformers_nor_harvest():
    code = (
        "import sys, train, train.sae, train.loader, train.trainer, train.run, train.cli; "
        "[getattr(train, n) for n in train.__all__]; "
        "bad = [m for m in sys.modules if m.split('.')[0] in ('transformers', 'harvest', 'vllm')]; "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stdout + p.stderr


def test_normalization_is_folded_into_the_export(planted, tmp_path):
    import cache_format as cf
    from train.sae import TopKSAE

    url, _ = planted
    out = tmp_path / "norm"
    r = run(
        [
            *FAST,
            "--cache",
            url,
            "--layers",
            "4",
            "--out",
            str(out),
            "--set",
            "train.normalize=true",
            "--set",
            "train.training_tokens=5120",
            "--set",
            "train.eval_every_tokens=5120",
        ]
    )
    assert r.exit_code == 0, repr(r.exception)
    entry = json.loads((out / "run.json").read_text())["saes"][0]
    cfg = json.loads((out / entry["path"] / "cfg.json").read_text())
    assert cfg["normalization"]["folded"] and cfg["normalization"]["input_scale"] != 1.0
    sae = TopKSAE(32, 192, 3)
    sae.load_state_dict(load_file(str(out / entry["path"] / "sae_weights.safetensors")), strict=False)
    rows = torch.from_numpy(np.load(out / "heldout" / "rows.npy"))
    x = cf.open_cache(url).residuals(4)[:][rows].float()
    with torch.no_grad():
        ve = 1 - float(((x - sae(x)) ** 2).sum() / ((x - x.mean(0)) ** 2).sum())
    assert ve == pytest.approx(entry["metrics"]["variance_explained"], abs=1e-4)  # raw residuals in, as trained


def test_too_few_heldout_sequences_is_one_line_and_run_json_counts_the_split(make_cache, tmp_path):
    from cache_format.split import is_heldout

    url, data = make_cache(segments=(400, 400), d_model=16)  # 80 sequences of 10 rows
    r = run(
        [
            *FAST,
            "--cache",
            url,
            "--out",
            str(tmp_path / "few"),
            "--set",
            "train.heldout_fraction=0.01",
            "--set",
            "train.training_tokens=512",
        ]
    )
    assert r.exit_code != 0 and "sequences are held out" in str(r.exception)
    assert "raise train.heldout_fraction" in str(r.exception) and not (tmp_path / "few").exists()
    out = tmp_path / "ok"
    r = run(
        [
            *FAST,
            "--cache",
            url,
            "--out",
            str(out),
            "--set",
            "train.heldout_fraction=0.3",
            "--set",
            "train.training_tokens=512",
            "--set",
            "train.batch_size=128",
        ]
    )
    assert r.exit_code == 0, r.output + repr(r.exception)
    run_json = json.loads((out / "run.json").read_text())
    sid, roles = np.asarray(data["rows"]["seq_ids"]), np.asarray(data["rows"]["roles"])
    held = is_heldout(sid, 0, 0.3) & np.isin(roles, [2, 3])  # thinking + answer: the cache has rollout roles
    assert run_json["recipe"]["name"] == "corpus"  # no recorded source: the 001 recipe, under the profile's keys
    for s in run_json["saes"]:
        assert s["split"]["heldout_sequences"] == len(np.unique(sid[held])) >= 8
        assert s["split"]["heldout_tokens"] == int(held.sum()) and s["split"]["fraction"] == 0.3


def test_a_cache_holding_rows_twice_is_refused_in_one_line_naming_retract(make_cache, tmp_path):
    import cache_format as cf
    from cache_format.layout import BF16

    url, data = make_cache(segments=(400, 400), d_model=16)
    w = cf.open_cache(url, mode="a")
    with w.segment() as seg:  # a second copy of sequence 3: what two harvests racing used to leave
        seg.append(
            {L: np.ones((10, 16), BF16) for L in w.layers},
            tokens=np.zeros(10, np.int32),
            seq_ids=np.full(10, 3),
            positions=np.arange(10),
        )
    r = run([*FAST, "--cache", url, "--out", str(tmp_path / "o"), "--set", "train.training_tokens=512"])
    msg = str(r.exception)
    assert isinstance(r.exception, UserError) and "\n" not in msg, repr(r.exception)
    assert "holds duplicated rows" in msg and f"retract {url} {seg.id}" in msg
    assert not (tmp_path / "o").exists()
