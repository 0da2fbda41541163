"""Learning at a fixed number of steps: the demo's model trained from scratch on SyntheticShapes for
``--steps`` steps (AdamW, cosine after a warmup), then COCO AP on held-out images of another seed.
The result does not depend on how loaded the host is, only the times do.

    python benchmarks/learning_at_fixed_steps.py --steps 400 --threads 1 --name bn \
        --config '{"fpn_norm": "batch_norm", "head_norm": "batch_norm"}'

``--config`` overrides :func:`keras_maskrcnn.presets.demo_config`; one JSON line per run is appended
to ``--results`` (BENCHMARKS.md, "From-scratch learning at equal steps").
"""
import argparse, json, os, time
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")
p = argparse.ArgumentParser()
p.add_argument("--steps", type=int, default=400)
p.add_argument("--batch", type=int, default=4)
p.add_argument("--size", type=int, default=160)
p.add_argument("--lr", type=float, default=2e-3)
p.add_argument("--wd", type=float, default=1e-4)
p.add_argument("--warmup", type=int, default=150, help="warmup steps (the demo's; 50 before session 16)")
p.add_argument("--config", default="{}")
p.add_argument("--threads", type=int, default=0)
p.add_argument("--name", default="x")
p.add_argument("--eval", type=int, default=40)
p.add_argument("--results", default="learning_at_fixed_steps.jsonl")
p.add_argument("--workdir", default="/tmp/learning_at_fixed_steps")
p.add_argument("--seed", type=int, default=0, help="initialisation and sampling seed (the data stay the same)")
a = p.parse_args()
import tensorflow as tf
if a.threads:
    tf.config.threading.set_intra_op_parallelism_threads(a.threads)
    tf.config.threading.set_inter_op_parallelism_threads(a.threads)
import keras
from keras_maskrcnn import MaskRCNN
from keras_maskrcnn.data import SyntheticShapes, synthetic_dataset
from keras_maskrcnn.evaluation import evaluate_coco
from keras_maskrcnn.optimizers import FusedAdamW
from keras_maskrcnn.presets import demo_config
keras.utils.set_random_seed(a.seed)
size = (a.size, a.size)
train = synthetic_dataset(5000, a.batch, image_size=size, seed=1, max_instances=16, repeat=True)
cfg = dict(demo_config(image_size=a.size), **json.loads(a.config))
model = MaskRCNN(num_classes=3, **cfg)
sched = keras.optimizers.schedules.CosineDecay(0.0, a.steps - a.warmup, alpha=0.05, warmup_target=a.lr, warmup_steps=a.warmup)
model.compile(optimizer=FusedAdamW(sched, weight_decay=a.wd, clipnorm=10.0))
t = time.time()
h = model.fit(train, epochs=a.steps // 25, steps_per_epoch=25, verbose=0)
tt = time.time() - t
hd = SyntheticShapes(size, seed=12345)
d = os.path.join(a.workdir, f"heldout_{a.size}")
ann = hd.write_coco(d, a.eval)
t2 = time.time()
m = evaluate_coco(model, ann, d, batch_size=8)
losses = {k: [round(v[0], 3), round(v[-1], 3)] for k, v in h.history.items()}
from keras_maskrcnn.precision import machine_summary
res = dict(machine=machine_summary(), name=a.name, seed=a.seed, steps=a.steps, batch=a.batch, lr=a.lr, warmup=a.warmup, config=a.config, train_s=round(tt), eval_s=round(time.time() - t2),
           segm50=round(m["segm"]["AP50"], 3), bbox50=round(m["bbox"]["AP50"], 3), segm=round(m["segm"]["AP"], 3), bbox_sml=[round(m["bbox"][k], 3) for k in ("APs", "APm", "APl")], losses=losses)
model.save(os.path.join(a.workdir, f"{a.name}.keras"))
print(json.dumps(res))
with open(a.results, "a") as f:
    f.write(json.dumps(res) + "\n")
