"""A training run's options: the config, its defaults per kind, and its CLI flags."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

from oodcore.store import cache as C
from oodcore.training.files import JobError

KINDS = ("energy", "flow")


INPUTS = ("pixels", "features")


MARGIN_MODES = ("auto", "paper")


@dataclass
class TrainConfig:
    """Everything that determines a training run (None = the kind's default, filled by `resolve`)."""

    kind: str
    benchmark: str
    arch: str | None = None
    input: str | None = None  # pixels (demo only) | features
    mask: str | None = None  # flows: checkerboard|horizontal|cyclic (pixels), halves|random (features)
    ood_objective: bool = False  # flows: push exposure-split OOD NLL above a margin
    epochs: int | None = None
    lr: float | None = None
    batch_size: int | None = None  # energy 64, flow 16 (pixels) / 64 (features)
    seed: int = 0
    clip: float = 10.0  # gradient-norm clipping
    # energy fine-tuning (Liu et al. 2020)
    lam: float | None = None  # energy 0.1, flow 1.0
    m_in: float | None = None
    m_out: float | None = None
    margins: str = "auto"  # when m_in/m_out are not given: auto (fit-split quantiles) | paper (-25/-7)
    temperature: float = 1.0
    # flows
    layers: int | None = None
    width: int | None = None
    bottleneck: int | None = None
    pca: int = 0
    margin: float | None = None  # absolute OOD margin in bits/dim; None -> ID batch NLL + margin_gap
    margin_gap: float = 1.0

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


def default_input(benchmark: str) -> str:
    return "pixels" if benchmark == "demo" else "features"


def resolve(cfg: TrainConfig, run: dict) -> TrainConfig:
    """Fill the defaults of this kind and input, and reject what cannot work (JobError)."""
    from oodcore.training import flows

    c = TrainConfig.from_dict(cfg.to_dict())
    if c.kind not in KINDS:
        raise JobError(f"unknown detector {c.kind!r}; choose from {', '.join(KINDS)}")
    c.arch = run["arch"]
    c.input = c.input or default_input(c.benchmark)
    if c.input not in INPUTS:
        raise JobError(f"--input must be one of {', '.join(INPUTS)}")
    if c.input == "pixels" and c.benchmark != "demo":
        raise JobError(
            "--input pixels needs the images' pixels, which only the demo benchmark keeps; "
            "use --input features (the cached penultimate features) for this benchmark"
        )
    for name, value in (
        ("epochs", c.epochs),
        ("batch-size", c.batch_size),
        ("layers", c.layers),
        ("width", c.width),
        ("bottleneck", c.bottleneck),
    ):
        if value is not None and value < 1:
            raise JobError(f"--{name} must be at least 1 (got {value})")
    for name, value in (("lr", c.lr), ("clip", c.clip), ("temperature", c.temperature)):
        if value is not None and not value > 0:
            raise JobError(f"--{name} must be positive (got {value})")
    if c.lam is not None and c.lam < 0:
        raise JobError(f"--lam must be >= 0 (got {c.lam})")
    if c.pca < 0:
        raise JobError(f"--pca must be >= 0 (got {c.pca})")
    if c.kind == "energy":
        if c.mask or c.ood_objective or c.pca or c.layers or c.width or c.bottleneck or c.margin is not None:
            raise JobError(
                "--mask, --ood-objective, --pca, --layers, --width, --bottleneck and --margin are flow options"
            )
        if (c.m_in is None) != (c.m_out is None):
            raise JobError("give both --m-in and --m-out, or neither (then --margins decides)")
        if c.margins not in MARGIN_MODES:
            raise JobError(f"--margins must be one of {', '.join(MARGIN_MODES)}")
        if c.m_in is not None and not c.m_in < c.m_out:
            raise JobError(f"--m-in ({c.m_in}) must be below --m-out ({c.m_out}): ID energies go low, OOD high")
        c.epochs = c.epochs or (5 if c.input == "pixels" else 10)
        c.lr = c.lr or 1e-3
        c.batch_size = c.batch_size or 64
        c.lam = 0.1 if c.lam is None else c.lam
    else:
        masks = flows.PIXEL_MASKS if c.input == "pixels" else flows.FEATURE_MASKS
        c.mask = c.mask or masks[0]
        if c.mask not in masks:
            raise JobError(f"--mask {c.mask} does not apply to {c.input}; choose from {', '.join(masks)}")
        if c.m_in is not None or c.m_out is not None:
            raise JobError("--m-in/--m-out are energy fine-tuning options")
        if c.input == "pixels" and c.pca:
            raise JobError("--pca applies to --input features")
        pixels = c.input == "pixels"
        c.epochs = c.epochs or (6 if pixels else 30)
        c.lr = c.lr or 1e-3
        c.batch_size = c.batch_size or (16 if pixels else 64)
        c.layers = c.layers or (8 if pixels else 6)
        c.width = c.width or (16 if pixels else 128)
        c.bottleneck = c.bottleneck or (8 if pixels else 32)
        c.lam = 1.0 if c.lam is None else c.lam
        if c.margin_gap < 0:
            raise JobError(f"--margin-gap must be >= 0 (got {c.margin_gap})")
    return c


def detector_name(c: TrainConfig) -> str:
    """The name the detector is published under (one per variant; a rerun replaces it)."""
    if c.kind == "energy":
        return "energy_ft" if c.input == "pixels" else "energy_ft_head"
    name = f"flow_{c.input}_{c.mask}"
    if c.pca:
        name += f"_pca{c.pca}"
    return name + ("_ood" if c.ood_objective else "")


def job_id_for(c: TrainConfig, run: dict) -> str:
    key = C.key_of({"config": c.to_dict(), "run": run.get("key"), "files": run.get("files", {})})
    return f"{detector_name(c)}-{key[:8]}"


def add_train_arguments(p) -> None:
    """The `train` subcommand's options (oodcore.cli registers them)."""
    p.add_argument("kind", choices=KINDS, help="energy: energy-bounded fine-tuning; flow: a RealNVP normalizing flow")
    p.add_argument("--benchmark", default="demo", help="a cached benchmark (default: demo)")
    p.add_argument("--arch", default=None, help="its architecture (default: the benchmark's only one)")
    p.add_argument(
        "--input",
        choices=INPUTS,
        default=None,
        help="pixels (demo only: the whole CNN / a flow on 32x32 digits) or features "
        "(cached penultimate features: the classifier head / a flow on embeddings); "
        "default: pixels for the demo, else features",
    )
    p.add_argument(
        "--mask",
        default=None,
        help="flow coupling masks: checkerboard|horizontal|cyclic (pixels), halves|random (features)",
    )
    p.add_argument(
        "--ood-objective", action="store_true", help="flow: also push OOD exposure-split NLL above a margin (bits/dim)"
    )
    p.add_argument(
        "--epochs", type=int, default=None, help="default: energy 5 (pixels) / 10 (head), flow 6 (pixels) / 30"
    )
    p.add_argument("--lr", type=float, default=None, help="Adam learning rate (default 1e-3)")
    p.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help="ID rows per step, and as many OOD rows (default: 64; pixel flows 16)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--clip", type=float, default=10.0, help="gradient-norm clipping")
    p.add_argument("--lam", type=float, default=None, help="weight of the OOD term (energy 0.1, flow 1.0)")
    p.add_argument("--m-in", type=float, default=None, help="energy: ID energy margin (with --m-out)")
    p.add_argument("--m-out", type=float, default=None, help="energy: OOD energy margin (with --m-in)")
    p.add_argument(
        "--margins",
        choices=MARGIN_MODES,
        default="auto",
        help="energy margins without --m-in/--m-out: auto = median / 95th percentile of the "
        "untuned fit-split energies; paper = -25 / -7 (Liu et al.'s CIFAR values)",
    )
    p.add_argument("--temperature", type=float, default=1.0, help="energy temperature T")
    p.add_argument("--layers", type=int, default=None, help="flow coupling layers (default 8 pixels / 6 features)")
    p.add_argument("--width", type=int, default=None, help="flow s/t-network width (default 16 pixels / 128 features)")
    p.add_argument(
        "--bottleneck", type=int, default=None, help="flow s/t-network bottleneck (default 8 pixels / 32 features)"
    )
    p.add_argument("--pca", type=int, default=0, help="flow on features: reduce to N principal components first")
    p.add_argument(
        "--margin",
        type=float,
        default=None,
        help="flow --ood-objective: absolute OOD margin in bits/dim (default: ID batch NLL + --margin-gap)",
    )
    p.add_argument("--margin-gap", type=float, default=1.0, help="flow --ood-objective: relative margin in bits/dim")
    p.add_argument("--resume", default=None, metavar="JOB_ID", help="resume that job with its stored options")
    p.add_argument(
        "--fresh", action="store_true", help="start over even if an unfinished job with these options exists"
    )
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads (default: 1 for the demo's small models, which run fastest on one "
        "thread; torch's choice otherwise)",
    )
    p.add_argument("--bootstrap", type=int, default=200, help="bootstrap replicates for the 95%% CIs")
    p.add_argument("--json", dest="json_file", default=None, help="write the result as JSON to FILE")


def config_from_args(args) -> TrainConfig:
    return TrainConfig(
        kind=args.kind,
        benchmark=args.benchmark,
        arch=args.arch,
        input=args.input,
        mask=args.mask,
        ood_objective=args.ood_objective,
        epochs=args.epochs,
        lr=args.lr,
        batch_size=args.batch_size,
        seed=args.seed,
        clip=args.clip,
        lam=args.lam,
        m_in=args.m_in,
        m_out=args.m_out,
        margins=args.margins,
        temperature=args.temperature,
        layers=args.layers,
        width=args.width,
        bottleneck=args.bottleneck,
        pca=args.pca,
        margin=args.margin,
        margin_gap=args.margin_gap,
    )


def config_to_argv(c: TrainConfig) -> list[str]:
    """CLI arguments that reproduce `c` (what the app's launcher runs)."""
    argv = [c.kind, "--benchmark", c.benchmark]
    flags = {
        "arch": "--arch",
        "input": "--input",
        "mask": "--mask",
        "epochs": "--epochs",
        "lr": "--lr",
        "batch_size": "--batch-size",
        "seed": "--seed",
        "clip": "--clip",
        "lam": "--lam",
        "m_in": "--m-in",
        "m_out": "--m-out",
        "margins": "--margins",
        "temperature": "--temperature",
        "layers": "--layers",
        "width": "--width",
        "bottleneck": "--bottleneck",
        "pca": "--pca",
        "margin": "--margin",
        "margin_gap": "--margin-gap",
    }
    for key, flag in flags.items():
        value = getattr(c, key)
        if value is not None:
            argv += [flag, repr(value) if isinstance(value, float) else str(value)]
    if c.ood_objective:
        argv.append("--ood-objective")
    return argv
