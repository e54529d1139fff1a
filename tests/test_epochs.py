"""`training.num_epochs` instead of `max_steps`: the steps are derived from the training data the stage holds
(dapt: packed rows; sft: examples of the mixture; reward: weighted pairs) and written where every later part
(schedule, checkpoint key, MLflow params) reads them."""
import math
import shutil

from refinery.config import TrainingArgs
from refinery.train.trainer import derive_max_steps


def test_steps_follow_epochs_examples_and_batch(capsys):
    t = TrainingArgs(max_steps=99, batch_size=4, num_epochs=2.5)
    derive_max_steps("dapt", t, examples=10, examples_per_step=4)
    assert t.max_steps == math.ceil(2.5 * 10 / 4) == 7
    assert "dapt: num_epochs 2.5 over 10 training examples (4 per step) -> max_steps 7" in capsys.readouterr().out
    unset = TrainingArgs(max_steps=99)
    derive_max_steps("dapt", unset, examples=10, examples_per_step=4)
    assert unset.max_steps == 99
    tiny = TrainingArgs(num_epochs=0.01)
    derive_max_steps("sft", tiny, examples=10, examples_per_step=4)
    assert tiny.max_steps == 1  # never zero steps


def test_one_epoch_of_dapt_and_sft_sees_the_training_data_once(project, prepared):
    """dapt: every packed row once; sft: about as many examples as the task sets hold (rows are drawn from the
    mixture, so the count is the expectation, within 25%)."""
    from flows.dapt import load_inputs as dapt_inputs
    from flows.sft import load_inputs as sft_inputs

    shutil.copytree(prepared, project / "data" / "prepared")
    job = dapt_inputs("params", "models/base", "data/prepared", {"training.num_epochs": 1})
    assert job.cfg.training.max_steps == math.ceil(len(job.train_rows) / job.cfg.training.batch_size)
    job = sft_inputs("params", "models/base", "data/prepared", {"training.num_epochs": 1})
    held = sum(sum(1 for _ in open(job.folder / t / "train.jsonl")) for t in job.cfg.tasks)
    drawn = sum(job.counts.values())
    assert 0.75 * held <= drawn <= 1.25 * held, (drawn, held)
