"""search: a study whose trials are plain training runs, a rerun that trains nothing,
a trial killed with kill -9 that runs again, two processes that share one study, a no-op space that
finds no winner, pruning, and the confirmation through compare's runs."""

import json
import os
import signal
import time

import optuna
import pytest
from conftest import paused_command, script_command

import mnist_recognition as app
from companions.experiments import search

FLAGS = ("--recipe", "fast", "--validation", 300, "--no-download", "--device", "cpu")
SPACE = ("--space", "lr=log:3e-3..3e-2", "batch_size=64,128")


def summary_of(out_dir):
    return json.loads((out_dir / "search.json").read_text())


def study_trials(out_dir):
    storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(out_dir / "study.journal")))
    return optuna.load_study(study_name="search", storage=storage).get_trials()


# --- the study ---------------------------------------------------------------------------------


def test_a_storage_that_cannot_be_opened_is_one_line_before_anything_is_written(tmp_path, cli):
    storage = tmp_path / "no such folder" / "study.journal"
    result = cli("search", "--space", "lr=1e-3..1e-2", "--storage", storage, "--out-dir", tmp_path / "search")
    assert result.code == 2 and not (tmp_path / "search").exists()
    assert result.errors() == [line for line in result.log.splitlines() if f"--storage {storage}" in line]


def test_a_trial_begun_once_every_place_is_taken_ends_at_once():
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="maximize")
    for accuracy in (90.0, 91.0):
        study.add_trial(optuna.trial.create_trial(value=accuracy))
    running, late = study.ask(), study.ask()  # the third place taken by a running trial, then one more
    search.check_needed(study, running, 3)
    with pytest.raises(search.Surplus):
        search.check_needed(study, late, 3)
    assert late.user_attrs == {"surplus": True}


def test_a_trials_settings_that_train_as_the_baseline_are_known_as_the_baseline():
    base = ["--recipe", "fast", "--validation", "10000"]
    assert search.is_baseline(base, "lr=0.015,batch_size=128")  # the fast recipe's own values
    assert not search.is_baseline(base, "lr=0.01,batch_size=128")


# --- a whole search on the synthetic data -----------------------------------------------------------


@pytest.fixture(scope="module")
def searched(tmp_path_factory, synthetic_data):
    """4 random trials by 2 workers, the best 2 confirmed over 3 seeds: (its folder, its flags)."""
    out_dir = tmp_path_factory.mktemp("searched") / "search"
    flags = (*FLAGS, "--data-dir", synthetic_data, *SPACE, "--sampler", "random", "--trials", 4)
    flags += ("--confirm", 2, "--seeds", 3)
    assert app.main(["search", *map(str, flags), "--workers", "2", "--out-dir", str(out_dir)]) == 0
    return out_dir, flags


@pytest.mark.slow
def test_a_search_writes_every_trial_the_confirmation_and_the_winner(searched):
    out_dir, _ = searched
    summary = summary_of(out_dir)
    assert [trial["state"] for trial in summary["trials"]] == ["complete"] * 4
    assert sorted(trial["number"] for trial in summary["trials"]) == [0, 1, 2, 3]
    for trial in summary["trials"]:
        assert trial["spec"].startswith("lr=")
        assert 3e-3 <= float(trial["spec"].split(",")[0][3:]) <= 3e-2
        assert trial["spec"].split(",")[1] in ("batch_size=64", "batch_size=128")
        assert (out_dir / "trials" / f"trial-{trial['number']}" / "lenet5_mnist.pt").is_file()
        assert (out_dir / "logs" / f"trial-{trial['number']}.log").is_file()
    confirmed = summary["confirmation"]["variants"]
    assert [entry["name"] for entry in confirmed][0] == "baseline" and len(confirmed) == 3
    assert all(len(entry["accuracies"]) == 3 for entry in confirmed)
    ranked = sorted(summary["trials"], key=lambda trial: -trial["accuracy"])
    assert [entry["name"] for entry in confirmed[1:]] == list(dict.fromkeys(t["spec"] for t in ranked))[:2]
    winner = max(confirmed[1:], key=lambda entry: entry["mean"])
    assert summary["winner"]["spec"] == winner["name"] and winner["verdict"] in summary["answer"]
    assert summary["winner"]["command"].startswith("python mnist_recognition.py --recipe fast")
    assert "--validation" not in summary["winner"]["command"]  # the winner trains on the whole split
    assert set(summary["importance"]) <= {"lr", "batch_size"}
    page = (out_dir / "search.html").read_text()
    assert 'id="answer"' in page and "data:image/png;base64," in page and winner["name"] in page
    assert "| trial |" in (out_dir / "search.md").read_text()


@pytest.mark.slow
def test_a_trial_is_a_plain_training_run_with_seed_0(searched):
    """The confirmation's seed-0 run of a trial's settings is that trial, run again by compare."""
    out_dir, _ = searched
    summary = summary_of(out_dir)
    accuracy = {trial["spec"]: trial["accuracy"] for trial in summary["trials"]}
    for entry in summary["confirmation"]["variants"][1:]:
        assert entry["accuracies"][0] == accuracy[entry["name"]]  # to the last digit


@pytest.mark.slow
def test_a_rerun_trains_nothing_new_and_gives_the_same_answer(searched, cli):
    out_dir, flags = searched
    before = {path: path.stat().st_mtime_ns for path in (out_dir / "trials").rglob("*.pt")}
    first = summary_of(out_dir)
    result = cli("search", *flags, "--workers", 2, "--out-dir", out_dir)
    assert result.code == 0 and "0 still to run" in result.log and "Trial " not in result.log
    assert {path: path.stat().st_mtime_ns for path in (out_dir / "trials").rglob("*.pt")} == before
    assert len(study_trials(out_dir)) == 4
    again = summary_of(out_dir)
    for trial in (*first["trials"], *again["trials"]):
        trial.pop("seconds")
    assert again == first


@pytest.mark.slow
def test_a_folder_of_another_search_is_refused(searched, cli):
    out_dir, flags = searched
    result = cli("search", *flags, "--lr", "0.01", "--out-dir", out_dir)
    assert result.code == 2 and "holds a search of another baseline or space" in result.errors()[0]


def short_search(synthetic_data, out_dir, *more):
    return (*FLAGS, "--data-dir", synthetic_data, "--confirm", 0, "--out-dir", out_dir, *more)


@pytest.mark.slow
def test_a_trial_killed_with_kill_9_runs_again_and_the_study_ends_as_an_uninterrupted_one(
    synthetic_data, tmp_path, background, cli
):
    flags = short_search(synthetic_data, tmp_path / "search", *SPACE, "--trials", 3, "--workers", 1)
    job = background(paused_command(1, 2, "search", *flags))  # every trial waits after its second batch
    log = tmp_path / "search" / "logs" / "trial-0.log"
    deadline = time.monotonic() + 120
    while not (log.is_file() and "paused at epoch 1, batch 2" in log.read_text()):
        assert time.monotonic() < deadline and job.process.poll() is None
        time.sleep(0.2)
    os.killpg(job.process.pid, signal.SIGKILL)
    job.process.wait()
    assert [trial.state.name for trial in study_trials(tmp_path / "search")] == ["RUNNING"]

    result = cli("search", *flags)
    assert result.code == 0 and "Trial 0 was left running by a process that no longer exists" in result.log
    trials = study_trials(tmp_path / "search")
    assert [trial.state.name for trial in trials] == ["FAIL", "COMPLETE", "COMPLETE", "COMPLETE"]
    retried = [trial for trial in trials if trial.system_attrs.get("failed_trial") == trials[0]._trial_id]
    assert trials[0].state.name == "FAIL" and len(retried) == 1 and retried[0].params == trials[0].params
    summary = summary_of(tmp_path / "search")
    assert sorted(trial["state"] for trial in summary["trials"]) == ["complete"] * 3 + ["fail"]


@pytest.mark.slow
def test_two_processes_sharing_a_storage_divide_the_trials_and_train_none_twice(synthetic_data, tmp_path, background):
    storage = tmp_path / "shared.journal"
    jobs = [
        background(
            script_command(
                "search",
                *short_search(synthetic_data, tmp_path / f"worker-{index}", *SPACE, "--trials", 6, "--workers", 1),
                "--storage",
                storage,
            )
        )
        for index in range(2)
    ]
    for job in jobs:
        assert job.process.wait(timeout=300) == 0
    trials = optuna.load_study(
        study_name="search",
        storage=optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(storage))),
    ).get_trials()
    trained = [trial for trial in trials if not trial.user_attrs.get("surplus")]
    assert sum(trial.state.name == "COMPLETE" for trial in trained) == 6 and len(trained) == 6
    by_process = {trial.user_attrs["process"] for trial in trained}
    assert len(by_process) == 2  # both worked
    folders = [
        tmp_path / f"worker-{index}" / "trials" / f"trial-{trial.number}" / "lenet5_mnist.pt"
        for trial in trained
        for index in range(2)
    ]
    assert sum(folder.is_file() for folder in folders) == 6  # each trial trained in exactly one process


@pytest.mark.slow
def test_a_space_of_the_baselines_own_values_finds_no_winner(synthetic_data, tmp_path, cli):
    flags = short_search(synthetic_data, tmp_path / "search", "--space", "lr=0.015", "batch_size=128")
    result = cli("search", *flags, "--confirm", 3, "--sampler", "grid", "--trials", 5, "--workers", 1)
    assert result.code == 0 and "The grid has 1 points: 1 trials, not 5" in result.log
    summary = summary_of(tmp_path / "search")
    assert summary["winner"] is None and summary["confirmation"] is None
    assert "nothing better than the baseline" in summary["answer"]


@pytest.mark.slow
def test_prune_stops_a_trial_after_an_epoch_its_pruner_calls_weak(synthetic_data, tmp_path, monkeypatch, cli):
    monkeypatch.setattr(search, "new_pruner", lambda args: optuna.pruners.ThresholdPruner(lower=101))  # every one
    flags = short_search(synthetic_data, tmp_path / "search", *SPACE, "--epochs", 3, "--trials", 2)
    assert cli("search", *flags, "--prune", "--workers", 1).code == 0
    summary = summary_of(tmp_path / "search")
    assert [trial["state"] for trial in summary["trials"]] == ["pruned", "pruned"]
    assert [list(trial["epochs"]) for trial in summary["trials"]] == [["1"], ["1"]]
    assert "No trial finished" in summary["answer"]
    checkpoint = app.torch.load(tmp_path / "search" / "trials" / "trial-0" / "checkpoint.pt", weights_only=True)
    assert checkpoint["progress"]["epoch"] == 1  # the run stopped after its first epoch
