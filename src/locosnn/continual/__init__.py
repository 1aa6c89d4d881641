"""Continual learning: task streams, the accuracy matrix and its metrics (``locosnn continual``).

The package: ``settings`` (:class:`ContinualConfig`, :func:`split_settings`), ``streams`` (the task
streams), ``metrics`` (evaluation into R and the metrics of R), ``replay`` (:class:`ReplayBuffer`)
and ``runner`` (:class:`ContinualRun`, :func:`run_continual`). Training runs the one loop of
:func:`locosnn.train.train_epoch`, per task; the command line lives in :mod:`locosnn.cli`.

One network, one rule instance and one optimiser learn a stream of tasks in
order (rule state such as LOCO's cluster memory or OWM's projectors carries
over task boundaries, as it must). After each task the network is evaluated on
the test split of *every* task of the stream, which fills one row of the
accuracy matrix R[i][j] = accuracy on task j after training task i.

Streams (built from any loaded :class:`~locosnn.data.Dataset`)
---------------------------------------------------------------
* ``class`` (alias ``split``; class-incremental): the classes are cut into
  ``n_tasks`` disjoint groups of ``classes_per_task`` that together cover every
  class (Fashion-MNIST: 5 tasks of 2 classes, {0,1}, {2,3}, ...). The order is
  0..C-1 unless ``class_order`` is a list, or ``"seeded"`` (a permutation drawn
  from the run seed). Each task's train / val / test splits hold only its classes.
* ``permuted`` (domain-incremental): every task has all classes; task t applies
  a fixed permutation of the input features (pixels) to train, val and test
  alike. **Task 0 is the identity** (the unpermuted data, the usual
  permuted-MNIST convention); tasks 1.. use permutations drawn from
  ``(seed, t)``, so they are fixed by the seed and differ across tasks and seeds.
  The permutation is applied on the fly (:class:`PermutedFeatures`): a stream
  of 10 permuted copies of a 60k-image set holds no copies in memory.
* ``label_sorted``: the stream the LOCO authors' code trains on. The training
  set is sorted by label (stable sort) and cut into ``n_tasks`` consecutive,
  equal-size chunks, each passed **in that order, without shuffling** (with
  ``epochs = 1``, one pass over the sorted set, as the authors do). A chunk's
  classes are the labels it contains (a class may straddle two chunks when
  n_tasks does not divide the classes); its val / test splits are the samples
  of those classes.

Evaluation modes
----------------
* ``task-agnostic``: the prediction is the argmax over all outputs (the
  network must also tell the tasks apart: the hard class-incremental setting).
* ``task-aware``: the task identity is given at test time; logits of classes
  outside the task's class list are masked out before the argmax (multi-head
  evaluation on a single head).
For ``permuted`` streams every task has every class, so both modes coincide.

Metrics (pure functions of R; T = number of rows = tasks trained)
------------------------------------------------------------------
* ``ACC`` (average accuracy) = mean_j R[T-1][j], after the last task;
* ``BWT`` (backward transfer, Lopez-Paz & Ranzato 2017) =
  mean_{j<T-1} (R[T-1][j] - R[j][j]); negative = forgetting;
* ``forgetting`` (Chaudhry et al. 2018, RWalk) = mean_{j<T-1} f_j with
  f_j = max_{i<T-1} R[i][j] - R[T-1][j] (the max runs over every earlier row,
  as in the paper; rows before task j is trained are ~chance and rarely the max);
* ``forgetting_per_task`` = [f_0, ..., f_{T-2}];
* ``last_task_acc`` = R[T-1][T-1];  ``LA`` (learning accuracy) = mean_j R[j][j].
BWT and forgetting are NaN for a single task. Extra columns (tasks not trained
yet) are ignored: the metrics use the leading T x T block.

Replay (``replay`` = buffer size in samples, 0 = off; works with any rule)
---------------------------------------------------------------------------
A class-balanced episodic memory (:class:`ReplayBuffer`). At the end of each
task it is re-balanced over every (task, class) group seen so far: each group
gets an equal share of ``replay`` slots (old groups keep the first samples
they stored, a new group's samples are drawn uniformly without replacement from
its task's training split). While training a later task, every mini-batch of
new samples is concatenated with ``replay_batch`` (default: ``batch_size``)
samples drawn uniformly without replacement from the buffer, and the rule sees
the mixed batch like any other (its ``.grad`` is for the mixed batch). The
buffer only ever holds samples of *finished* tasks.

Run directory (``out``), written atomically after every task
--------------------------------------------------------------
  config.json     settings (TrainConfig fields + continual fields), git SHA, versions, machine, dataset, tasks
  matrix.json     R per evaluation mode, the metrics per mode, the tasks and a per-task training history
  results.csv     tidy: one row per (after_task, eval_task, mode) with acc (pandas.read_csv)
  checkpoint.pt   network, optimiser, rule state, replay buffer, RNG states, R, tasks done
``resume=True`` continues exactly after the last finished task (bit-identical
to an uninterrupted run); work done on an unfinished task is discarded. A
non-finite loss or update raises :class:`~locosnn.errors.NonFiniteError` and
keeps the last checkpoint. The rule's hooks are called as everywhere: ``setup`` once (its warnings
printed), ``end_epoch`` after each epoch, ``end_task`` at each task boundary.
"""
from __future__ import annotations

from .metrics import (average_accuracy, backward_transfer, continual_metrics, evaluate_task, evaluate_tasks,
                      forgetting, last_task_accuracy, learning_accuracy, per_task_forgetting, predictions,
                      task_aware_predictions)
from .replay import ReplayBuffer
from .runner import ContinualRun, run_continual
from .settings import (AGNOSTIC, AWARE, CONTINUAL_KEYS, DEFAULT_EPOCHS_PER_TASK, EVAL_CHOICES, STREAM_ALIASES, STREAMS,
                       ContinualConfig, split_settings)
from .streams import PermutedFeatures, Task, build_stream, class_incremental, label_sorted, permuted, task_permutation

__all__ = ["AGNOSTIC", "AWARE", "CONTINUAL_KEYS", "DEFAULT_EPOCHS_PER_TASK", "EVAL_CHOICES", "STREAMS", "STREAM_ALIASES",
           "ContinualConfig", "ContinualRun", "PermutedFeatures", "ReplayBuffer", "Task", "average_accuracy",
           "backward_transfer", "build_stream", "class_incremental", "continual_metrics", "evaluate_task",
           "evaluate_tasks", "forgetting", "label_sorted", "last_task_accuracy", "learning_accuracy",
           "per_task_forgetting", "permuted", "predictions", "run_continual", "split_settings", "task_aware_predictions",
           "task_permutation"]
