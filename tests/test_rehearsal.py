"""The real run, as typed, at its real counts: the shipped pipeline.toml through `make harvest`,
`make train` and `make report`, at 150 SuperGPQA questions.

Only what a CPU cannot do is swapped: the model (the tiny one), the dataset (a file written
here in SuperGPQA's schema), the generation budget, the layers the tiny model has, the
device, and where the cache and run go. Everything else (split, recipe, unit sizes, mixing,
analysis rows) is the shipped default, so a change that breaks the real run fails here.
"""

import hashlib
import json
import random
import subprocess
from pathlib import Path

import pytest

import cache_format as cf

REPO = Path(__file__).resolve().parents[1]
SUBJECTS = [
    ("Science", "Mathematics", "Algebra"),
    ("Engineering", "Mechanics", "Statics"),
    ("History", "World History", "Modern History"),
    ("Medicine", "Pharmacology", "Dosage"),
]


def write_supergpqa(path: Path, n: int) -> None:
    """Questions in SuperGPQA's own schema (its columns, 4 to 10 options A-J)."""
    r = random.Random(0)
    with open(path, "w") as f:
        for i in range(n):
            a, b = r.randint(2, 50), r.randint(2, 50)
            n_opt = r.choice([4, 6, 8, 10, 10, 10])
            opts = sorted({a + b} | set(r.sample([x for x in range(4, 101) if x != a + b], n_opt - 1)))
            d, fld, sub = SUBJECTS[i % len(SUBJECTS)]
            f.write(
                json.dumps(
                    {
                        "uuid": hashlib.md5(str(i).encode()).hexdigest(),
                        "question": f"What is {a} + {b}?",
                        "options": [str(o) for o in opts],
                        "answer": str(a + b),
                        "answer_letter": "ABCDEFGHIJ"[opts.index(a + b)],
                        "discipline": d,
                        "field": fld,
                        "subfield": sub,
                        "difficulty": r.choice(["easy", "middle", "hard"]),
                        "is_calculation": True,
                    }
                )
                + "\n"
            )


def make(target: str, *args: str) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        ["make", "--no-print-directory", "-C", str(REPO), target, *args], capture_output=True, text=True
    )
    assert proc.returncode == 0, f"make {target} failed:\n{proc.stderr[-3000:]}"
    return proc


@pytest.mark.slow
def test_the_shipped_pipeline_at_150_questions(tmp_path):
    dataset = tmp_path / "supergpqa.jsonl"
    write_supergpqa(dataset, 300)
    cache, out = tmp_path / "cache", tmp_path / "run"
    swap = " ".join(
        [
            'model.name_or_path="builtin:tiny"',
            'model.dtype="float32"',
            'model.device_map="cpu"',
            f'supergpqa.dataset="{dataset}"',
            "supergpqa.max_new_tokens=64",
            'train.device="cpu"',
        ]
    )
    common = [f"CONFIG={REPO / 'pipeline.toml'}", f"CACHE={cache}", f"SET={swap}"]

    h = make("harvest", "LAYERS=1,3,5", *common)
    assert "150 rollouts" in h.stderr
    c = cf.open_cache(cache)
    seqs = c.sequences().to_pylist()
    assert len(seqs) == 150 and len(c.segments) == 10  # units of 16 questions
    assert all(s["forced"] == s["truncated"] for s in seqs)  # every missing answer was forced, and says why
    assert all(s["missing"] in ("thinking_unclosed", "no_answer") for s in seqs if s["forced"])
    assert all(s["is_calculation"] is True and json.loads(s["options"]) for s in seqs)  # every dataset column kept
    assert c.meta["source"]["prompt_format"] == "supergpqa" and c.meta["source"]["max_new_tokens"] == 64

    t = make("train", *common, f"OUT={out}")
    assert "recipe rollouts (the 000 card)" in t.stderr
    run = json.loads((out / "run.json").read_text())
    assert run["recipe"]["name"] == "rollouts" and run["recipe"]["epochs"] == 20
    assert [(s["d_sae"], s["k"]) for s in run["saes"]] == [(4096, 32)] * 3
    for s in run["saes"]:
        assert s["split"]["fraction"] == 0.1 and s["split"]["heldout_sequences"] >= 8
        assert s["split"]["heldout_tokens"] > 0 and s["metrics"]["eval_tokens"] > 0
        traj = [json.loads(x) for x in (out / s["name"] / "trajectory.jsonl").read_text().splitlines()]
        assert any(row.get("train_aux_loss", 0) > 0 for row in traj)  # the fitted dead threshold lets AuxK fire

    make("report", *common, f"OUT={out}")
    for s in run["saes"]:
        a = json.loads((out / s["name"] / "analysis.json").read_text())
        assert a["split"]["rows"] == "all" and a["split"]["labeled"]  # AUROC over every labeled row, as the card
        assert a["summary"]["tokens"] > s["split"]["heldout_tokens"]
        assert json.loads((out / s["name"] / "loss_recovered.json").read_text())["tokens"] > 0
    page = (out / "report.html").read_text()
    assert "all labeled rows" in page
