"""The reference table: kiln's fit() beside scikit-learn's own estimators on every built-in dataset.

    .venv/bin/python -m bench.reference

For each dataset, kiln trains the spec kept below, and scikit-learn fits MLPClassifier and LogisticRegression
(classification) or MLPRegressor (regression), with max_iter raised so they converge, on the very split kiln
trains on: the same rows, seed and standardisation. The table compares their validation metric (accuracy, or
R²) with the better of the references, is printed, and replaces the table in TRAINING.md between the markers.
The exit status is 1 if kiln falls below the reference anywhere.
"""

import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import accuracy_score, r2_score
from sklearn.neural_network import MLPClassifier, MLPRegressor

from kiln.catalog import BUILTIN_DATASETS, Task
from kiln.spec import JobSpec
from models.weights import predict
from worker.preparation import prepare
from worker.training import fit

SEED = 0
TRAINING_MD = Path(__file__).resolve().parent.parent / "TRAINING.md"
BEGIN, END = "<!-- reference table: begin (bench/reference.py writes it) -->", "<!-- reference table: end -->"

# kiln's spec per dataset: data.dataset, the seed and the default 20% validation split are filled in below.
SPECS: dict[str, dict] = {
    "digits": {
        "model": {"type": "cnn", "dims": 2, "channels": [32, 64], "hidden": [128], "dropout": 0.3},
        "optimizer": {"type": "adamw", "lr": 0.003, "weight_decay": 0.01},
        "scheduler": {"type": "one_cycle"}, "epochs": 30, "batch_size": 32,
    },
    "iris": {
        "model": {"type": "mlp", "hidden": [16]},
        "optimizer": {"type": "adam", "lr": 0.01}, "epochs": 100, "batch_size": 16,
    },
    "wine": {
        "model": {"type": "mlp", "hidden": [32], "dropout": 0.2},
        "optimizer": {"type": "adam", "lr": 0.01}, "epochs": 60, "batch_size": 16,
    },
    "breast_cancer": {  # a linear model: logistic regression, with decoupled weight decay for its L2 penalty
        "model": {"type": "mlp", "hidden": []}, "loss": "bce",
        "optimizer": {"type": "adamw", "lr": 0.01, "weight_decay": 0.1}, "epochs": 100, "batch_size": 32,
    },
    "diabetes": {
        "model": {"type": "mlp", "hidden": [16], "activation": "tanh", "dropout": 0.1},
        "optimizer": {"type": "adamw", "lr": 0.003, "weight_decay": 0.1}, "epochs": 200, "batch_size": 32,
        "early_stopping": {"patience": 20, "min_delta": 0.001},
    },
    "moons": {
        "model": {"type": "mlp", "hidden": [64, 64]},
        "optimizer": {"type": "adam", "lr": 0.01}, "scheduler": {"type": "cosine"}, "epochs": 60,
        "batch_size": 32,
    },
    "blobs": {  # gaussian blobs are linearly separable as far as they separate at all
        "model": {"type": "mlp", "hidden": []},
        "optimizer": {"type": "adam", "lr": 0.01}, "epochs": 40, "batch_size": 32,
    },
    "regression": {
        "model": {"type": "mlp", "hidden": []},
        "optimizer": {"type": "sgd", "lr": 0.01, "momentum": 0.9}, "epochs": 40, "batch_size": 32,
    },
    "sine": {
        "model": {"type": "rnn", "cell": "gru", "hidden_size": 32},
        "optimizer": {"type": "adam", "lr": 0.005}, "epochs": 60, "batch_size": 32,
        "early_stopping": {"patience": 10},
    },
}


def references(task: Task) -> dict[str, object]:
    if task is Task.regression:
        return {"MLPRegressor": MLPRegressor(max_iter=2000, random_state=SEED)}
    return {
        "MLPClassifier": MLPClassifier(max_iter=2000, random_state=SEED),
        "LogisticRegression": LogisticRegression(max_iter=5000),
    }


def summary(spec: JobSpec) -> str:
    """A few words on what kiln trained, for the table."""
    model = spec.model.model_dump(exclude_defaults=True, exclude={"type"})
    extras = [spec.optimizer.type, *([spec.scheduler.type] if spec.scheduler.type != "none" else []),
              *(["early_stopping"] if spec.early_stopping else []), f"{spec.epochs} epochs"]
    return f"{spec.model.type} {model}".replace("'", "") + ", " + ", ".join(extras)


def compare(name: str) -> dict[str, object]:
    info = BUILTIN_DATASETS[name]
    spec = JobSpec.model_validate({"data": {"dataset": name}, "seed": SEED} | SPECS[name])
    job = prepare(spec)
    split = job.split
    t0 = time.perf_counter()
    result = fit(job.model, job.data, spec)
    kiln_s = time.perf_counter() - t0
    # Through the weights' own predict(), from raw inputs, as a user of the trained model would see it.
    raw_val = split.x_val * split.input_std + split.input_mean
    predicted = predict(job.model, job.meta, raw_val)
    if info.task is Task.regression:
        metric = "R²"
        kiln = r2_score(split.y_val * split.target_std + split.target_mean, predicted)
    else:
        metric = "accuracy"
        kiln = accuracy_score(split.y_val, predicted)

    scores = {}
    t0 = time.perf_counter()
    for label, estimator in references(info.task).items():
        estimator.fit(split.x_train, split.y_train)  # the standardised train rows kiln trained on
        scores[label] = estimator.score(split.x_val, split.y_val)  # accuracy, or R²
    sklearn_s = time.perf_counter() - t0
    best = max(scores, key=scores.get)
    kiln_r, ref_r = round(float(kiln), 4), round(float(scores[best]), 4)
    verdict = "beats" if kiln_r > ref_r else "matches" if kiln_r == ref_r else "below"
    return {
        "dataset": name, "task": info.task.value, "metric": metric, "kiln": kiln_r, "reference": ref_r,
        "estimator": best, "verdict": verdict, "kiln_s": kiln_s, "sklearn_s": sklearn_s,
        "stopped": result.stopped, "spec": summary(spec), "val_rows": len(split.y_val),
    }


def table(rows: list[dict]) -> str:
    lines = [
        "| dataset | task | metric | kiln | sklearn reference | verdict | kiln's spec |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['dataset']} | {r['task']} | {r['metric']} ({r['val_rows']} rows) | {r['kiln']:.4f} | "
            f"{r['reference']:.4f} ({r['estimator']}) | {r['verdict']} | {r['spec']} |"
        )
    return "\n".join(lines)


def write_into(path: Path, text: str) -> None:
    content = path.read_text()
    head, rest = content.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    path.write_text(f"{head}{BEGIN}\n{text}\n{END}{tail}")


def main() -> int:
    # Models this small train faster on one thread than on several that wait for each other.
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", category=ConvergenceWarning)
    np.seterr(all="ignore")
    started = time.perf_counter()
    rows = []
    for name in BUILTIN_DATASETS:
        row = compare(name)
        rows.append(row)
        print(f"{name}: kiln {row['kiln']:.4f} in {row['kiln_s']:.1f} s ({row['stopped'] or 'all epochs'}); "
              f"{row['estimator']} {row['reference']:.4f} in {row['sklearn_s']:.1f} s: {row['verdict']}",
              file=sys.stderr)
    text = table(rows) + f"\n\nTotal run time {time.perf_counter() - started:.0f} s."
    print(text)
    write_into(TRAINING_MD, text)
    return 1 if any(r["verdict"] == "below" for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
