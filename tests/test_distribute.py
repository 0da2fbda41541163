"""Distributed training: MirroredStrategy (two logical CPU devices) and MultiWorkerMirroredStrategy
(two worker processes on 127.0.0.1) give the same weights as one device on the same global batch.

Each run happens in a subprocess (logical devices and TF_CONFIG must be set before TensorFlow
initialises); this file is also the subprocess' script (``python test_distribute.py MODE ...``).
Every comparison is made with both RoIAlign implementations of ``MultiLevelROIAlign``: the
stock-op ``crop_and_resize`` path always, the compiled op of ``custom_ops/`` when it loads (else
skipped; a failure with ``KERAS_MASKRCNN_REQUIRE_CUSTOM_OP=1``). A subprocess trains a fresh model
per implementation, forced by setting the layers' ``use_custom_op``, and saves what the layers
resolved to; the assertion messages name it.

Making the runs comparable: everything that differs between one device with batch 2 and two
replicas with batch 1 each must be taken out, and what is left is exactly the loss reduction.
Float differences remain (summation order; TensorFlow's convolutions round differently for batch
2 and batch 1: the C4/C5 maps of an image differ by ~1e-6). Any *choice* made on float values can
flip on such a difference, so the test leaves no score-dependent choice:

* Proposals. At initialisation the objectness logits are all close to 0, so their sigmoid scores
  sit close to 0.5, where float32 resolves only 6e-8: exact ties and sub-1e-7 gaps, on which
  proposal top-k and NMS can flip between the runs. Rescaling the objectness weights would spread
  the scores but not make near-ties impossible, so instead every anchor is kept: one anchor per
  position (341 for a 64 x 64 image), per-level top-k (1000) above the anchors of the largest
  level (256), ``rpn_post_nms_top_n_train`` 341 and ``rpn_nms_threshold`` 1.5, which no IoU
  exceeds (at 1.0 TensorFlow's NMS drops exact duplicates). The proposals are the decoded
  anchors, a continuous function of the weights, and their score order matters nowhere.
* Random sampling. Anchors and RoIs are sampled with unseeded random ops, which draw different
  numbers on every replica. ``rpn_batch_size_per_image`` (384) is above the number of anchors
  and ``box_batch_size_per_image`` (384) above the number of RoI candidates (341 proposals + at
  most 4 ground-truth boxes), with ``rpn_positive_fraction`` 1.0 and 48 positive RoI slots (the
  mask head's RoIs; these images have at most 16 positives): then *every* labelled anchor and
  candidate RoI is sampled, whatever the random numbers, and only the order of the sampled RoIs
  is random, which changes nothing but float summation order. (Seeding the sampler would not do:
  one device draws ``[2, N]`` numbers, each replica ``[1, N]``.)
* FPN levels. Every RoI of a 64 x 64 image is pooled from P2 (the next level starts at 112 px),
  so no level assignment can flip either.
* Batch statistics. ``backbone_norm="frozen_bn"``, no norm in the FPN and heads: trainable batch norm normalises by per-replica
  statistics, a different function of the data (see :mod:`keras_maskrcnn.distribute`).
* Data. No flips, no shuffling, same images; 64 x 64 images need no batch padding.
* Initial weights. Every run loads the same weights file.

The premise is checked, not assumed: a hook on ``keras_maskrcnn.targets.sample_rois`` (installed
by the subprocess, not in the library) records every image's proposals and sampled RoIs (boxes
and labels) at every step, and before any weight is compared the test asserts that each image got
all 341 anchors as proposals and all its candidates as RoIs, and that the proposals and the RoIs
of the two runs pair up one to one within 1e-3 px, with equal labels.

What is *not* configured away: with identical weights and RoIs, the step-1 gradients of one batch
of 2 and of two batches of 1 can differ by far more than rounding. With the small preset's
earlier mask head (four 3x3 convolutions of the FPN width) they differed by up to 5e-5 of a
layer's largest gradient (4e-4, in a few elements, with the compiled op and the test's earlier
setup), where the random RoI order alone gives 1e-6. Forward values differ by ~1e-6
(convolutions; the two RoIAlign implementations also differ from each other by that much), which
fits ReLU / max-pool derivative switches at inputs within rounding of a kink: a lottery either
implementation can lose. This randomly initialised ResNet without normalisation amplifies such
differences, the more the larger the learning rate: with that mask head, after 3 steps, up to
5.1e-4 at learning rate 0.02 (with three anchors per position), 8e-5 at 0.01, 9e-6 at 0.005 and
1.1e-6 at 0.0025, with the RoIs identical at steps 1 and 2 in all of these. The test's earlier
setup (32 proposals after a 0.7 NMS, learning rate 0.02) also had identical proposals at steps
1 and 2 here; its crop_and_resize runs agreed to 6e-8 and its custom_op runs differed by 1.4e-4.
With the current preset (two 64-channel mask convolutions) the lottery is won even at 0.02
(1.1e-7 with crop_and_resize, two batches of 1 emulating the replicas in-process); the test keeps
0.0025 as its margin.

Measured (AMD EPYC, AVX2, TensorFlow 2.21, current preset; largest update 0.036), max weight
difference to one device after 3 steps, with the reduction of :mod:`keras_maskrcnn.distribute`
(each replica's losses normalised by the counts all-reduced over replicas):

======================  ===============  =========
run                     crop_and_resize  custom_op
======================  ===============  =========
mirrored, eager         7.5e-8           7.5e-8
multi-worker, eager     3.0e-8           3.2e-8
mirrored, graph         3.0e-8           3.0e-8
multi-worker, graph     3.0e-8           3.0e-8
======================  ===============  =========

Synchronized batch norm (``test_synchronized_batch_norm_two_devices_match_one_device``): the same
setup with trainable batch norm in the backbone, the FPN and the heads (masked over the valid RoIs
there), every layer synchronized, two replicas against one device on both images; the weights
compared include the moving statistics, after one step (``BN_STEPS``): 1.2e-6 (largest update 0.41,
a moving statistic). Later steps add nothing to check (one step exercises the all-reduced
statistics, their gradients and the moving-statistics update) but batch norm of a random network
amplifies float differences about 30x per step: over 3 steps the proposals differed by 8e-6, 8e-5
and 5e-3 px (beyond the 1e-3 px pairing), the weights by 1.4e-3; at learning rate 0.00025 by
7.6e-6..1.1e-4 over three runs, the last at the bound, with a discrete statistic (class_accuracy, an
argmax over near-tied initial logits) 1 % apart. Per-replica batch norm (the negative control) is
0.50 off after the one step.

The test allows 1e-4. A wrong reduction is caught (``test_wrong_reduction_is_detected``, slow):
per-replica means divided by ``num_replicas_in_sync`` are off by 2.6e-3, because the replicas'
images have different numbers of positive RoIs (mask loss) and labelled anchors (RPN losses).
The distributed runs go through ``keras_maskrcnn.train.train`` (callbacks, backup, chief-only
outputs), the reference through ``model.fit``.
"""
import json
import os
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
STEPS = 3
GLOBAL_BATCH = 2
LEARNING_RATE = 0.0025
IMPLEMENTATIONS = ("crop_and_resize", "custom_op")
NUM_ANCHORS = 341  # of a 64 x 64 image, one per position at strides 4..64: 16^2 + 8^2 + 4^2 + 2^2 + 1
BOX_TOLERANCE = 1e-3  # px, for pairing up proposals / RoIs of two runs
WEIGHT_BOUND = 1e-4
REDUCTION_ENV = "TEST_DISTRIBUTE_REDUCTION"  # subprocess only: replace the loss reduction (negative control)
NORM_ENV = "TEST_DISTRIBUTE_NORM"  # subprocess: "batch_norm" or "sync_batch_norm" (trainable BN everywhere)
BN_STEPS = 1  # the batch norm model's steps (module docstring)


def model_config(norm=None):
    """The comparison's model; ``norm="batch_norm"``: trainable batch norm in the backbone, the FPN
    and the heads (the small preset's norms), for the synchronized batch norm tests."""
    from keras_maskrcnn.presets import small_model_config

    config = dict(
        small_model_config(image_size=64),
        backbone_norm="frozen_bn",
        fpn_norm=None,  # no batch statistics anywhere (the small preset has batch norm in the FPN and heads)
        head_norm=None,
        fpn_channels=32,
        representation_size=64,
        aspect_ratios=(1.0,),  # one anchor per position: 341 anchors, all of which become RoIs
        rpn_pre_nms_top_n_train=1000,  # > 256 anchors of the largest level: top-k keeps them all
        rpn_post_nms_top_n_train=NUM_ANCHORS,  # every anchor becomes a proposal ...
        rpn_nms_threshold=1.5,  # ... as NMS suppresses only IoU > 1.5, i.e. nothing
        rpn_batch_size_per_image=384,  # > 341 anchors: all labelled anchors are sampled
        rpn_positive_fraction=1.0,
        box_batch_size_per_image=384,  # > 341 proposals + 4 ground truth: all are sampled ...
        box_positive_fraction=0.125,  # ... with 48 positive slots (the mask head's RoIs)
    )
    if norm:
        config.update(backbone_norm="batch_norm", fpn_norm="batch_norm", head_norm="batch_norm")
    return config


def _steps(norm):
    """Training steps of a run: ``BN_STEPS`` for the batch norm model (module docstring)."""
    return BN_STEPS if norm else STEPS


def _compared_weights(model, norm):
    """The weights the runs compare: with batch norm, the moving statistics too (replica 0's copy
    under a strategy)."""
    return model.weights if norm else model.trainable_weights


def make_dataset():
    from keras_maskrcnn.data import synthetic_dataset

    return synthetic_dataset(
        8, GLOBAL_BATCH, image_size=(64, 64), max_instances=4, instances_per_image=(1, 3), seed=0,
        flip_probability=0.0, shuffle=False, repeat=True, drop_remainder=True,
    )


# ------------------------------------------------------------------------------------------
# Subprocess side
# ------------------------------------------------------------------------------------------


def _record_sampling():
    """Wrap ``keras_maskrcnn.targets.sample_rois`` (looked up by the model at each call) so that
    every call appends, per image, its ground truth, proposals and sampled RoIs (boxes + label) to
    the returned list. Works eagerly and in ``tf.function`` (a stateful ``numpy_function`` the
    outputs depend on), on every replica (replica threads append to the one list)."""
    import tensorflow as tf

    from keras_maskrcnn import targets

    original = targets.sample_rois
    records = []

    def record(proposals, num_proposals, gt_boxes, gt_classes, rois, labels, valid):
        for i in range(len(num_proposals)):
            records.append(dict(
                gt=gt_boxes[i][gt_classes[i] > 0],
                proposals=proposals[i, : num_proposals[i]],
                rois=np.concatenate([rois[i][valid[i]], labels[i][valid[i], None].astype(np.float32)], axis=1),
            ))
        return np.int32(0)

    def sample_rois(proposals, num_proposals, gt_boxes, gt_classes, *args, **kwargs):
        out = original(proposals, num_proposals, gt_boxes, gt_classes, *args, **kwargs)
        done = tf.numpy_function(
            record, [proposals, num_proposals, gt_boxes, gt_classes, out["rois"], out["labels"], out["valid"]],
            tf.int32, stateful=True,
        )
        with tf.control_dependencies([done]):
            return {name: tf.identity(value) for name, value in out.items()}

    targets.sample_rois = sample_rois
    return records


def _replace_reduction(kind):
    """Negative control: replace ``global_batch_shares`` by a wrong reduction."""
    from keras_maskrcnn import distribute

    if kind == "divide_by_replicas":
        distribute.global_batch_shares = lambda means, counts: means / float(distribute.num_replicas_in_sync())
    else:
        raise ValueError(f"unknown {REDUCTION_ENV}={kind!r}")


def _train(strategy, init_weights, eager, implementation, output_dir=None):
    """Train STEPS steps under ``strategy`` with the RoIAlign ``implementation``: with
    ``keras_maskrcnn.train.train`` into ``output_dir`` when given, else with ``model.fit``.
    Returns (weights list, history dict, info dict)."""
    import keras

    from keras_maskrcnn import MaskRCNN
    from keras_maskrcnn.distribute import fit_scope
    from keras_maskrcnn.train import train

    if os.environ.get(REDUCTION_ENV):
        _replace_reduction(os.environ[REDUCTION_ENV])
    norm = os.environ.get(NORM_ENV)
    with strategy.scope():
        model = MaskRCNN(num_classes=3, **model_config(norm))
        if norm == "sync_batch_norm":
            from keras_maskrcnn.layers.norm import synchronize_batch_norm

            assert synchronize_batch_norm(model) > 0
        poolers = [model.box_roi_align, model.mask_roi_align]
        for layer in poolers:  # forced, whatever "auto" would choose (set before the first call)
            layer.use_custom_op = implementation == "custom_op"
        model.build()
        model.load_weights(init_weights)
        model.compile(optimizer=keras.optimizers.SGD(LEARNING_RATE, momentum=0.9), run_eagerly=eager)
    steps = _steps(norm)
    if output_dir is None:
        with fit_scope(model):  # works around keras-team/keras#20329 under MultiWorkerMirroredStrategy
            history = model.fit(make_dataset(), epochs=1, steps_per_epoch=steps, verbose=0)
    else:
        history = train(model, make_dataset(), output_dir, epochs=1, steps_per_epoch=steps, backup_every=2, verbose=0)
    info = {
        "use_custom_op": [bool(layer.use_custom_op) for layer in poolers],
        "replicas": int(strategy.num_replicas_in_sync),
        "reduction": os.environ.get(REDUCTION_ENV, "global_batch_shares"),
        "norm": norm,
    }
    return [np.asarray(w) for w in _compared_weights(model, norm)], history.history, info


def _save(path, records, weights, history, info):
    np.savez(path, *weights)
    np.savez(path + ".sampling.npz", **{f"{i}_{k}": v for i, r in enumerate(records) for k, v in r.items()})
    with open(path + ".json", "w") as f:
        json.dump({"history": {k: [float(x) for x in v] for k, v in history.items()}, "info": info}, f)


def _two_cpu_devices():
    """Two logical devices on the one CPU (must be set before TensorFlow initialises)."""
    import tensorflow as tf

    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    assert strategy.num_replicas_in_sync == 2
    return strategy


def _shares_main(out):
    """``global_batch_shares`` and ``sum_over_replicas`` run by two replicas (MirroredStrategy)."""
    import tensorflow as tf

    from keras_maskrcnn import distribute

    strategy = _two_cpu_devices()
    case = json.loads(os.environ["SHARES_CASE"])

    def per_replica(values, dtype):
        return strategy.experimental_distribute_values_from_function(
            lambda ctx: tf.constant(values[ctx.replica_id_in_sync_group], dtype))

    def step(means, counts, items):
        shares = distribute.global_batch_shares(means, counts)
        with tf.GradientTape() as tape:
            tape.watch(items)  # one loss, the mean over this replica's items
            share = distribute.global_batch_shares(
                tf.reduce_sum(items)[None] / tf.maximum(tf.cast(tf.size(items), tf.float32), 1.0),
                tf.size(items)[None])[0]
        return (shares, distribute.sum_over_replicas(counts), tape.gradient(share, items),
                tf.constant(distribute.num_replicas_in_sync()))

    results = strategy.run(step, args=(per_replica(case["means"], tf.float32), per_replica(case["counts"], tf.float32),
                                       per_replica(case["items"], tf.float32)))
    local = [[t.numpy().tolist() for t in strategy.experimental_local_results(r)] for r in results]
    with strategy.scope():  # cross-replica context
        replicas_outside = distribute.num_replicas_in_sync()
    with open(out, "w") as f:
        json.dump({"shares": local[0], "summed_counts": local[1], "item_grads": local[2], "replicas": local[3],
                   "replicas_outside": replicas_outside}, f)


def _worker_main(argv):
    mode, out = argv[0], argv[1]
    if mode == "shares":
        return _shares_main(out)
    init_weights, eager, implementations = argv[2], argv[3] == "eager", argv[4].split(",")
    import keras
    import tensorflow as tf

    keras.config.disable_traceback_filtering()

    if mode == "cli-mirrored":
        # `keras-maskrcnn train --strategy mirrored` over two logical CPU devices (on a machine
        # without GPUs MirroredStrategy() would take the one CPU device only).
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
        from keras_maskrcnn import distribute
        from keras_maskrcnn.cli import main

        original = distribute.get_strategy
        distribute.get_strategy = lambda name, devices=None: original(
            name, devices=["/cpu:0", "/cpu:1"] if name == "mirrored" else devices)
        sys.exit(main(["train", "--synthetic", "4", "--synthetic-size", "64", "--synthetic-val", "0",
                       "--epochs", "1", "--steps-per-epoch", "2", "--batch-size", "2", "--warmup-steps", "1",
                       "--strategy", "mirrored", "--output", out, "--verbose", "0"]))
    suffix = ""
    if mode == "multi_worker":
        # Created first, before anything else touches TensorFlow (TF_CONFIG names this worker).
        strategy = tf.distribute.MultiWorkerMirroredStrategy()
        suffix = f".{json.loads(os.environ['TF_CONFIG'])['task']['index']}"
    elif mode == "mirrored":
        strategy = _two_cpu_devices()
    else:
        strategy = tf.distribute.get_strategy()
    records = _record_sampling()
    # One process trains every implementation in turn (a fresh model each): starting TensorFlow
    # and the strategy costs more than the 3 steps.
    for implementation in implementations:
        records.clear()
        path = f"{out}.{implementation}"
        output_dir = path + ".run" if mode != "single" else None  # distributed runs go through train()
        result = _train(strategy, init_weights, eager, implementation, output_dir=output_dir)
        _save(path + suffix + ".npz", records, *result)


# ------------------------------------------------------------------------------------------
# Test side
# ------------------------------------------------------------------------------------------


def _env():
    env = dict(os.environ)
    env.pop("TF_CONFIG", None)
    env.pop(REDUCTION_ENV, None)
    env.pop(NORM_ENV, None)
    env.pop("KERAS_MASKRCNN_ROI_ALIGN", None)  # "auto" as in the library; the runs force their implementation anyway
    env["TF_CPP_MIN_LOG_LEVEL"] = "2"
    env["PYTHONPATH"] = os.pathsep.join([os.path.dirname(HERE)] + env.get("PYTHONPATH", "").split(os.pathsep))
    return env


def _spawn(mode, out, init_weights="-", eager=False, implementations=("crop_and_resize",), env=None):
    return subprocess.Popen(
        [sys.executable, os.path.abspath(__file__), mode, str(out), str(init_weights), "eager" if eager else "graph",
         ",".join(implementations)],
        env=env or _env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )


def _wait(procs, timeout=900):
    deadline = time.time() + timeout
    outputs = []
    for proc in procs:
        try:
            output, _ = proc.communicate(timeout=max(deadline - time.time(), 1))
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            raise
        outputs.append(output)
    for proc, output in zip(procs, outputs):
        assert proc.returncode == 0, output[-5000:]
    return outputs


class Run:
    """What one training subprocess saved: weights, loss history, info (which RoIAlign ran, ...)
    and the sampling records (one dict per image and step)."""

    def __init__(self, path, what):
        path = self.path = str(path)
        with np.load(path) as data:
            self.weights = [data[f"arr_{i}"] for i in range(len(data.files))]
        with open(path + ".json") as f:
            saved = json.load(f)
        self.history, self.info = saved["history"], saved["info"]
        with np.load(path + ".sampling.npz") as data:
            count = len({name.split("_", 1)[0] for name in data.files})
            self.records = [{k: data[f"{i}_{k}"] for k in ("gt", "proposals", "rois")} for i in range(count)]
        use = set(self.info["use_custom_op"])
        ran = {frozenset([True]): "custom_op", frozenset([False]): "crop_and_resize"}.get(frozenset(use), "mixed")
        self.label = f"{what} (RoIAlign {ran}, use_custom_op={self.info['use_custom_op']})"
        self.implementation = ran


def _by_image(run):
    """Records by image (its ground-truth boxes, exact: the data are identical in every run)."""
    groups = {}
    for record in run.records:
        key = record["gt"].astype(np.float32).tobytes()
        assert key not in groups, f"{run.label}: an image sampled twice in {len(run.records) // GLOBAL_BATCH} steps"
        groups[key] = record
    return groups


def _pair_up(a, b, tol):
    """The number of rows left unpaired when the rows of ``a`` and ``b`` ([N, k]) are paired one to
    one, each pair within ``tol`` in every column (a maximum bipartite matching; 0: the two are
    the same multiset up to ``tol``)."""
    if a.shape[1:] != b.shape[1:]:
        return max(len(a), len(b))
    close = np.all(np.abs(a[:, None, :].astype(np.float64) - b[None, :, :]) <= tol, axis=-1)
    neighbours = [np.flatnonzero(row) for row in close]
    owner = np.full(len(b), -1)

    def augment(i, seen):
        for j in neighbours[i]:
            if not seen[j]:
                seen[j] = True
                if owner[j] < 0 or augment(owner[j], seen):
                    owner[j] = i
                    return True
        return False

    paired = sum(augment(i, np.zeros(len(b), bool)) for i in range(len(a)))
    return max(len(a), len(b)) - paired


def _check_premise(run):
    """Every image of every step got every anchor as a proposal and every candidate as a RoI."""
    records = len(run.records)
    assert records == _steps(run.info.get("norm")) * GLOBAL_BATCH, f"{run.label}: {records} sampling records"
    for r in run.records:
        assert len(r["proposals"]) == NUM_ANCHORS, f"{run.label}: {len(r['proposals'])} proposals, not every anchor"
        candidates = NUM_ANCHORS + len(r["gt"])
        assert len(r["rois"]) == candidates, f"{run.label}: {len(r['rois'])} of {candidates} candidate RoIs sampled"


def _compare_sampling(reference, distributed, steps=None):
    """Before any weight: the same proposals and the same sampled RoIs (boxes and labels), image
    by image, at each of the first ``steps`` steps (None: every step)."""
    context = f"{distributed.label} vs {reference.label}"
    steps = len(reference.records) // GLOBAL_BATCH if steps is None else steps
    _check_premise(reference)
    _check_premise(distributed)
    ref_images, dist_images = _by_image(reference), _by_image(distributed)
    assert sorted(ref_images) == sorted(dist_images), f"{context}: the runs saw different images"
    for index, record in enumerate(reference.records[: steps * GLOBAL_BATCH]):  # one device: step by step
        other = dist_images[record["gt"].astype(np.float32).tobytes()]
        for name in ("proposals", "rois"):
            unpaired = _pair_up(record[name], other[name], BOX_TOLERANCE)
            assert unpaired == 0, (
                f"{context}: step {index // GLOBAL_BATCH + 1}, image with ground truth {record['gt'].tolist()}: "
                f"{unpaired} of {len(record[name])} {name} differ (by more than {BOX_TOLERANCE} px, or in label)"
            )


def _weight_difference(reference, distributed):
    return max(float(np.max(np.abs(r - d))) for r, d in zip(reference.weights, distributed.weights))


def _compare(reference, distributed, initial, implementation):
    context = f"{distributed.label} vs {reference.label}"
    assert reference.implementation == distributed.implementation == implementation, f"{context}: not {implementation}"
    _compare_sampling(reference, distributed)
    assert len(reference.weights) == len(distributed.weights) == len(initial)
    moved = max(float(np.max(np.abs(r - i))) for r, i in zip(reference.weights, initial))
    assert moved > 1e-3, f"{context}: training did not change the weights; the comparison would be vacuous"
    worst = _weight_difference(reference, distributed)
    print(f"{context}: max weight difference {worst:.3g} (largest update {moved:.3g})")
    assert worst < WEIGHT_BOUND * max(moved, 1.0), (
        f"{context}: max weight difference {worst} (largest update {moved})")
    # The losses and detectron2's statistics (each reduced over replicas as sums of numerators and
    # denominators) as logged per epoch, one device against the replicas.
    from keras_maskrcnn.training_statistics import STATISTIC_NAMES

    logged = set(reference.history)
    assert set(STATISTIC_NAMES) <= logged and {"loss", "mask_loss"} <= logged, f"{context}: logged {sorted(logged)}"
    for name, values in reference.history.items():
        np.testing.assert_allclose(
            distributed.history[name], values, rtol=2e-4, atol=1e-6, err_msg=f"{context}: {name}")


@pytest.fixture(scope="module")
def init_weights(tmp_path_factory):
    return _initial_weights(tmp_path_factory)


def _initial_weights(tmp_path_factory, norm=None):
    """(path, weights) of the runs' common initial model: the weights :func:`_train` compares
    (with batch norm, the moving statistics too)."""
    import keras

    from keras_maskrcnn import MaskRCNN

    keras.utils.set_random_seed(1)
    model = MaskRCNN(num_classes=3, **model_config(norm))
    model.build()
    path = tmp_path_factory.mktemp(f"{norm}-init" if norm else "init") / "init.weights.h5"
    model.save_weights(str(path))
    return path, [np.asarray(w) for w in _compared_weights(model, norm)]


def _available_implementations():
    from keras_maskrcnn.ops import custom_roi_align

    return [i for i in IMPLEMENTATIONS if i != "custom_op" or custom_roi_align.available()]


@pytest.fixture(params=IMPLEMENTATIONS)
def implementation(request):
    """The RoIAlign implementation compared; custom_op only where the compiled op loads."""
    if request.param not in _available_implementations():
        from keras_maskrcnn.ops import custom_roi_align
        from test_custom_op import _unavailable  # skips, or fails with KERAS_MASKRCNN_REQUIRE_CUSTOM_OP=1

        _unavailable(custom_roi_align.unavailable_reason())
    return request.param


def _free_ports(n):
    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def _run_all(mode, folder, init_weights, eager, implementations, env=None):
    """Train with each of ``implementations`` under ``mode`` ("single", "mirrored" or
    "multi_worker": two worker processes); returns ``{implementation: [Run per process]}``."""
    what = {"single": "one device", "mirrored": "mirrored", "multi_worker": "multi-worker"}[mode]
    what += "" if mode == "single" else (" eager" if eager else " graph")
    out = folder / mode
    if mode != "multi_worker":
        _wait([_spawn(mode, out, init_weights, eager, implementations, env=env)])
        return {i: [Run(f"{out}.{i}.npz", what)] for i in implementations}
    cluster = {"worker": [f"127.0.0.1:{p}" for p in _free_ports(2)]}
    procs = []
    for index in range(2):
        worker_env = dict(env or _env())
        worker_env["TF_CONFIG"] = json.dumps({"cluster": cluster, "task": {"type": "worker", "index": index}})
        procs.append(_spawn(mode, out, init_weights, eager, implementations, env=worker_env))
    _wait(procs)
    return {i: [Run(f"{out}.{i}.{w}.npz", f"{what}, worker {w}") for w in range(2)] for i in implementations}


@pytest.fixture(scope="module")
def runs(init_weights, tmp_path_factory):
    """``runs(mode, eager)``: the runs of :func:`_run_all` for every available implementation,
    trained on first use and kept for the module (one subprocess serves both implementations)."""
    cache = {}

    def get(mode, eager=True):
        if (mode, eager) not in cache:
            folder = tmp_path_factory.mktemp(f"{mode}-{'eager' if eager else 'graph'}")
            cache[mode, eager] = _run_all(mode, folder, init_weights[0], eager, _available_implementations())
        return cache[mode, eager]

    return get


def _check_outputs(run_dir):
    """train() wrote the chief's outputs (only those) and removed its finished backup."""
    assert sorted(os.listdir(run_dir)) == ["checkpoints", "classes.json", "history.csv", "logs", "model.keras"]
    assert os.listdir(os.path.join(run_dir, "checkpoints")) == ["epoch-001.keras"]


@pytest.mark.parametrize("eager", [True, pytest.param(False, marks=pytest.mark.slow)], ids=["eager", "graph"])
def test_mirrored_two_devices_match_one_device(init_weights, runs, implementation, eager):
    reference = runs("single")[implementation][0]  # model.fit, eager
    (mirrored,) = runs("mirrored", eager)[implementation]
    _compare(reference, mirrored, init_weights[1], implementation)
    _check_outputs(mirrored.path.replace(".npz", ".run"))


@pytest.mark.parametrize("eager", [True, pytest.param(False, marks=pytest.mark.slow)], ids=["eager", "graph"])
def test_multi_worker_two_processes_match_one_process(init_weights, runs, implementation, eager):
    reference = runs("single")[implementation][0]
    workers = runs("multi_worker", eager)[implementation]
    records = workers[0].records + workers[1].records  # each worker recorded its own replica's images
    for worker in workers:  # both must hold the same weights
        worker.records = records
        _compare(reference, worker, init_weights[1], implementation)
    _check_outputs(workers[0].path.replace(".0.npz", ".run"))  # written by the chief alone


@pytest.mark.slow
def test_wrong_reduction_is_detected(init_weights, runs, tmp_path):
    """Negative control: with per-replica means divided by the number of replicas (exact only when
    every replica samples as many items) the same comparison fails the weight bound."""
    reference = runs("single")["crop_and_resize"][0]
    env = _env()
    env[REDUCTION_ENV] = "divide_by_replicas"
    (wrong,) = _run_all("mirrored", tmp_path, init_weights[0], True, ["crop_and_resize"], env=env)["crop_and_resize"]
    _compare_sampling(reference, wrong, steps=1)  # the same RoIs (later steps start from other weights)
    worst = _weight_difference(reference, wrong)
    print(f"{wrong.label}, means / num_replicas: max weight difference {worst:.3g}")
    assert worst > 3 * WEIGHT_BOUND, f"a wrong reduction gives only {worst}: the test could not tell"


@pytest.fixture(scope="module")
def bn_init_weights(tmp_path_factory):
    """Initial weights of the model with trainable batch norm everywhere: (path, every weight,
    moving statistics included)."""
    return _initial_weights(tmp_path_factory, "batch_norm")


@pytest.fixture(scope="module")
def bn_runs(bn_init_weights, tmp_path_factory):
    """``bn_runs(mode, norm)``: one crop_and_resize run of the batch norm model (``norm``
    "batch_norm" or "sync_batch_norm"), trained on first use. The RoIAlign implementation is
    not what these tests are about; the stock one runs everywhere."""
    cache = {}

    def get(mode, norm):
        if (mode, norm) not in cache:
            env = _env()
            env[NORM_ENV] = norm
            folder = tmp_path_factory.mktemp(f"{mode}-{norm}")
            runs = _run_all(mode, folder, bn_init_weights[0], True, ["crop_and_resize"], env=env)
            cache[mode, norm] = runs["crop_and_resize"][0]
        return cache[mode, norm]

    return get


def test_synchronized_batch_norm_two_devices_match_one_device(bn_init_weights, bn_runs):
    """The whole model with trainable batch norm in the backbone, FPN and heads (masked batch
    norm over the valid RoIs there), synchronized: two replicas of one image each train to the
    weights and moving statistics of one device on both images."""
    reference = bn_runs("single", "batch_norm")  # one replica: plain batch norm on the global batch
    synchronized = bn_runs("mirrored", "sync_batch_norm")
    assert synchronized.info["norm"] == "sync_batch_norm"
    _compare(reference, synchronized, bn_init_weights[1], "crop_and_resize")


def test_unsynchronized_batch_norm_replicas_differ(bn_init_weights, bn_runs):
    """Negative control: the same two replicas with plain (per-replica) batch norm are far outside
    the bound (every anchor and candidate still taken, so only the statistics differ)."""
    reference = bn_runs("single", "batch_norm")
    plain = bn_runs("mirrored", "batch_norm")
    _check_premise(plain)
    worst = _weight_difference(reference, plain)
    print(f"{plain.label}, per-replica batch norm: max weight difference {worst:.3g}")
    assert worst > 3 * WEIGHT_BOUND, f"per-replica batch norm gives only {worst}: the test could not tell"


@pytest.mark.slow
def test_train_command_with_mirrored_strategy(tmp_path):
    proc = _spawn("cli-mirrored", tmp_path / "run")
    output = _wait([proc])[0]
    assert "replicas   2 (mirrored), 1 image(s) per replica" in output  # the plan cli.py prints
    assert (tmp_path / "run" / "model.keras").is_file() and not (tmp_path / "run" / "backup").exists()


def test_train_command_has_strategy_and_backup_options():
    from keras_maskrcnn.cli import build_parser

    parser = build_parser()
    args = parser.parse_args(["train", "--synthetic", "2", "--output", "x", "--strategy", "multi_worker",
                              "--backup-every", "50"])
    assert args.strategy == "multi_worker" and args.backup_every == 50
    assert parser.parse_args(["train", "--synthetic", "2", "--output", "x"]).strategy == "default"
    with pytest.raises(SystemExit):
        parser.parse_args(["train", "--synthetic", "2", "--output", "x", "--strategy", "tpu"])


def test_global_batch_shares_sum_to_the_global_mean(tmp_path):
    import tensorflow as tf

    from keras_maskrcnn.distribute import global_batch_shares, num_replicas_in_sync, sum_over_replicas

    # One replica: unchanged.
    means = tf.constant([1.0, 2.0])
    np.testing.assert_allclose(global_batch_shares(means, tf.constant([3.0, 0.0])).numpy(), [1.0, 2.0])
    assert float(sum_over_replicas(tf.constant(5.0))) == 5.0
    assert num_replicas_in_sync() == 1

    # Two replicas (MirroredStrategy over two logical CPU devices, in a subprocess). Four losses,
    # each replica's value the mean over its own items: different counts, a replica without items,
    # no items at all.
    counts = np.array([[3, 1, 0, 0], [1, 4, 5, 0]], np.float32)
    sums = np.array([[4.5, 2.0, 0.0, 0.0], [0.5, 12.0, 35.0, 0.0]], np.float32)
    items = [[1.0, 2.0, 3.0], [4.0]]  # one loss, for its gradient: 3 items on replica 0, 1 on replica 1
    case = {"means": (sums / np.maximum(counts, 1)).tolist(), "counts": counts.tolist(), "items": items}
    env = _env()
    env["SHARES_CASE"] = json.dumps(case)
    _wait([_spawn("shares", tmp_path / "shares.json", env=env)], timeout=300)
    with open(tmp_path / "shares.json") as f:
        result = json.load(f)
    assert result["replicas"] == [2, 2] and result["replicas_outside"] == 2
    np.testing.assert_allclose(result["summed_counts"], [counts.sum(0)] * 2)
    global_mean = sums.sum(0) / np.maximum(counts.sum(0), 1)  # what one device computes on both replicas' items
    np.testing.assert_allclose(np.sum(result["shares"], axis=0), global_mean, rtol=1e-6)
    np.testing.assert_allclose(np.sum(result["shares"], axis=0), [1.25, 2.8, 7.0, 0.0], rtol=1e-6)
    # The summed gradients are those of the global mean: 1 / (all items) for every item, on both
    # replicas (per-replica means divided by 2 would give 1/6 and 1/2).
    np.testing.assert_allclose(result["item_grads"][0], [0.25] * 3, rtol=1e-6)
    np.testing.assert_allclose(result["item_grads"][1], [0.25], rtol=1e-6)


if __name__ == "__main__":
    _worker_main(sys.argv[1:])
