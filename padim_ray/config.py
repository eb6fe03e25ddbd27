"""Defaults in one place: every number here comes from the PaDiM paper or from a measured limit."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from padim_ray.errors import PadimError

FORMAT_VERSION = 1  # model store layout; bump when store.py changes what it writes
MAPS_FORMAT_VERSION = 1  # anomaly-map store layout
UPDATE_BYTES = 16 * 2**20  # float64 working memory of one statistics update: positions are folded in slices
#                            of this size (scripts/profile_actor.py --update-mib)
BATCH_SIZES = {"cpu": 16, "cuda": 32}  # frames per forward pass without --batch-size, by the actor's device. On CPU,
#   16 holds half the activations of 32 (the stem's output alone is 64x128x128 floats per frame at 256x256): an
#   R18-Rd100 actor peaks 190 MiB lower at the same frames/s (scripts/profile_actor.py --batch-size). A GPU
#   keeps 32, for larger kernels (not measured on a GPU)
BACKBONE_DTYPES = ("float32", "bfloat16")  # ModelConfig.backbone_dtype
SCENES_IN_FLIGHT = 2  # fit stc --scene all: one scene embedding, one preparing or writing its model
# Upper bounds of options and inputs, checked before any cluster work: beyond them a run would only
# exhaust memory somewhere deep in a worker
MAX_IMAGE_SIZE = 1024  # --image-size: an actor's accumulator grows with (size / 4)^2 * dims^2 (R18-Rd100 at 1024: 5.2 GB)
MAX_FRAME_STRIDE = 100_000  # --frame-stride: more than an hour of 25 fps video between two frames
MAX_BATCH_SIZE = 256  # --batch-size: a ResNet's stem alone takes 4 MiB of activations per 256x256 frame
MAX_FRAME_SIDE = 8192  # height or width of an input frame (its header) and of --map-size: 8192x8192 RGB is 192 MiB
MAX_FPS = 240  # render --fps
CALIBRATION_FRACTION = 0.05  # fit --calibration: share of the footage scored by the model without it (calibrate.py)
MAX_CALIBRATION_FRACTION = 0.5  # at most this share is set aside: the model still holds every frame, but scores it without them


class ConfigError(PadimError):
    """An option out of its range."""


def require(values: dict, rules: dict[str, tuple]) -> None:
    """Raise ConfigError for the first option whose value fails its (test, wording) rule; None passes."""
    for name, (test, wording) in rules.items():
        value = values[name]
        if value is not None and not test(value):
            raise ConfigError(f"--{name.replace('_', '-')} must be {wording}, got {value}")


def between(low: float, high: float) -> tuple:
    """The rule low <= value <= high."""
    return (lambda v: low <= v <= high, f"at least {low:g} and at most {high:g}")


@dataclass(frozen=True)
class ModelConfig:
    """What defines a PaDiM model: two fits with equal ModelConfigs on equal frames are equal."""

    backbone: str = "resnet18"  # PaDiM-R18-Rd100, the paper's STC entry (91.2 pixel AUROC)
    dims: int | None = None  # None: the backbone's default (100 for R18, 550 for WR50)
    weights: str = "imagenet"  # "imagenet", "none" (seeded random init) or a file path
    image_size: int = 256  # STC frames are resized to 256x256, aspect not kept (paper, sec. 4)
    seed: int = 1024  # seeds the random channel subset ("Rd") and random-init weights
    eps: float = 0.01  # regulariser added to each covariance, eq. (1)
    frame_stride: int = 1  # use every n-th frame of each video (1 = all frames)
    backbone_dtype: str = "float32"  # the backbone's arithmetic: "float32" (strict, TF32 off, on every device) or
    #   "bfloat16" (autocast; embeddings differ from float32 by ~1e-2 relative). Part of the model's identity:
    #   statistics of the two are never mixed in one model (a resume or an update keeps the stored one)

    def __post_init__(self):
        require(vars(self), {
            "dims": (lambda v: v >= 1, "at least 1 (or left out for the backbone's default)"),
            "image_size": (
                lambda v: 32 <= v <= MAX_IMAGE_SIZE and v % 16 == 0, f"a multiple of 16 of at least 32 and at most {MAX_IMAGE_SIZE} (stage 3 has stride 16)",
            ),
            "seed": (lambda v: v >= 0, "at least 0"),
            "eps": (lambda v: v > 0, "positive"),
            "frame_stride": between(1, MAX_FRAME_STRIDE),
            "backbone_dtype": (lambda v: v in BACKBONE_DTYPES, " or ".join(BACKBONE_DTYPES)),
        })

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class ClusterConfig:
    """How a fit is spread over Ray; changes speed, never the result."""

    actors: int | None = None  # None: one per GPU, or one per CPU node running torch on all its cores
    gpus_per_actor: float | None = None  # None: 1 when the cluster has GPUs, else 0
    cpus_per_actor: float | None = None  # None: a whole node less its decode share (CPU), cpus_per_gpu_actor (GPU)
    cpus_per_gpu_actor: float = 1.0  # a GPU actor only feeds its GPU; the node's other CPUs decode
    decode_share: float = 1 / 16  # of a CPU node's CPUs (at least 1) left to decode tasks: decoding to 256x256
    #                               costs ~6% of an R18 forward pass per frame (scripts/bench_fit.py: 450-530
    #                               vs ~30 frames/s on 2 cores)
    batch_size: int | None = None  # frames per forward pass; None: BATCH_SIZES for the actor's device
    fan_in: int = 4  # partials merged per reduction task
    shard_bytes: int = 128 * 2**20  # bound on one statistics shard in the object store
    decode_batch: int = 16  # frames per block emitted by a decode task
    frames_queued: int = 1024  # decoded frames that may wait per actor (192 MiB at 256x256): decoding runs
    #                            ~16x faster than an R18 forward pass on CPU, and without this bound it runs
    #                            ahead and the object store grows with the video (scripts/bench_memory.py)
    checkpoint_every: float = 300.0  # seconds between checkpoints of each stats actor: an R18-Rd100 save
    #                                  writes 330 MB (~1 s), a WR50-Rd550 one 10 GB (docs/performance.md, "Checkpoint cost")
    max_retries: int = 3  # stats actors that may be lost in one fit before it stops (and can be resumed)
    gpu_wait: float = 900.0  # seconds to wait for the autoscaler to add GPU workers (clusters that start from zero)
    resource_wait: float = 600.0  # seconds actors may wait to start on a joined cluster whose free CPUs/GPUs
    #                               cannot hold them (other jobs'), before the command fails instead of waiting forever

    def __post_init__(self):
        require(vars(self), {
            "actors": (lambda v: v >= 1, "at least 1"),
            "gpus_per_actor": (lambda v: v >= 0, "at least 0"),
            "cpus_per_actor": (lambda v: v > 0, "positive"),
            "batch_size": between(1, MAX_BATCH_SIZE),
            "fan_in": (lambda v: v >= 2, "at least 2"),
            "shard_bytes": (lambda v: v >= 1, "at least 1"),
            "decode_batch": (lambda v: v >= 1, "at least 1"),
            "frames_queued": (lambda v: v >= 1, "at least 1"),
            "checkpoint_every": (lambda v: v >= 0, "at least 0 seconds"),
            "max_retries": (lambda v: v >= 0, "at least 0"),
            "gpu_wait": (lambda v: v >= 0, "at least 0 seconds"),
            "resource_wait": (lambda v: v > 0, "positive (seconds)"),
        })


@dataclass(frozen=True)
class ScoreConfig:
    """How anomaly maps are made and stored."""

    blur_sigma: float = 4.0  # Gaussian filter on the upsampled map (paper, sec. 3)
    blur_truncate: float = 4.0  # kernel radius = truncate * sigma = 16 px (33 taps), scipy's default
    blur_at: str = "model"  # "model": blur at the model's input size, then resize to the map size, as the
    #                         paper and anomalib do (sigma 4 of 256 px); "map": blur at the map size (a
    #                         sigma-4 blur at 856x480 is a third as wide relative to the frame, on 6x the pixels)
    map_dtype: str = "float16"  # half the disk of float32; distances stay within 1e-3 relative
    chunk_frames: int = 16  # frames per zarr chunk of a map sequence

    def __post_init__(self):
        require(vars(self), {
            "blur_sigma": (lambda v: v > 0, "positive"),
            "blur_at": (lambda v: v in ("model", "map"), "model or map"),
            "map_dtype": (lambda v: v in ("float16", "float32"), "float16 or float32"),
            "chunk_frames": (lambda v: v >= 1, "at least 1"),
        })
