"""Datasets by name, and :func:`build_dataset` for mixture specs like ``"easy_vqa:0.5,shapes:0.5"``.

Spec grammar (comma-separated sources; weights optional but all-or-nothing)::

    spec    := source ("," source)*
    source  := NAME [":" WEIGHT]                         e.g. shapes, shapes:0.3
             | NAME ":" PATH ["?" OPTIONS] [":" WEIGHT]  for file datasets: jsonl:/data/train.jsonl:0.2
    OPTIONS := KEY "=" VALUE ("&" KEY "=" VALUE)*         e.g. llava:/d/chat.json?images=/d/images

Names are exact registry keys (``shapes`` never matches ``shapes2``). Weights are positive
numbers, normalised to sum to 1; with no weights every source weighs the same. A single source
is returned as the dataset itself (wrapped in a :class:`~minivlm.data.mixture.Mixture` only when
a ``length`` is asked of a fixed-size dataset). File datasets (``jsonl``, ``llava``, ``coco``,
``webdataset``, ``parquet``, ``hf``) are used as given for every split. Paths may contain ``:``
but not ``,`` or ``?``. Each file dataset names the options it takes (``images``: the folder
image paths are relative to, for LLaVA, chat JSONL and COCO, whose images live apart from the
annotations); an unknown option is an error listing them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch.utils.data import Dataset

from minivlm.data.charts import ChartsDataset
from minivlm.data.coco import CocoCaptionsDataset
from minivlm.data.easy_vqa import EasyVQA, EasyVQADialogues
from minivlm.data.grouped import GroupedQuestions
from minivlm.data.jsonl import ChatJsonlDataset
from minivlm.data.llava import LlavaJsonDataset
from minivlm.data.mixture import Mixture, check_weight
from minivlm.data.multi_image import MultiImageDataset
from minivlm.data.retrieval import RetrievalDataset
from minivlm.data.shapes import ShapesDataset
from minivlm.data.synthetic import SyntheticDataset
from minivlm.data.video import VideoDataset


@dataclass(frozen=True)
class DatasetRequest:
    """What :func:`build_dataset` asks a factory for. ``path`` is set for file datasets only;
    ``length`` only when a single source was given a length (fixed-size datasets ignore it and
    :func:`build_dataset` cycles through them instead)."""

    split: str
    seed: int
    image_size: int
    length: int | None = None
    path: str | None = None
    strict: bool = False  # file datasets: the first bad record raises instead of being skipped
    options: tuple[tuple[str, str], ...] = ()  # file datasets: the spec's ?key=value pairs

    def option(self, key: str, default: str | None = None) -> str | None:
        return dict(self.options).get(key, default)


DatasetFactory = Callable[[DatasetRequest], Dataset]


@dataclass(frozen=True)
class _Entry:
    factory: DatasetFactory
    takes_path: bool
    options: tuple[str, ...] = ()


_REGISTRY: dict[str, _Entry] = {}


def register_dataset(name: str, factory: DatasetFactory, *, takes_path: bool = False,
                     options: tuple[str, ...] = ()) -> None:
    """Make ``name`` usable in specs. ``takes_path``: the spec gives a file (``name:PATH``);
    ``options``: the ``?key=value`` options it accepts after the path.

    Raises:
        ValueError: ``name`` is taken, or is not a plain identifier (it must parse in a spec).
    """
    if not name.isidentifier():
        raise ValueError(f"dataset names must be identifiers (letters, digits, _), got {name!r}")
    if name in _REGISTRY:
        raise ValueError(f"dataset {name!r} is already registered")
    _REGISTRY[name] = _Entry(factory, takes_path, tuple(options))


def available_datasets() -> list[str]:
    return sorted(_REGISTRY)


@dataclass(frozen=True)
class SourceSpec:
    """One parsed source of a spec."""

    name: str
    weight: float | None
    path: str | None = None
    options: tuple[tuple[str, str], ...] = ()

    @property
    def label(self) -> str:
        """Unique name of the source inside a mixture (file sources include their path and
        options); parses back to the same source."""
        if self.path is None:
            return self.name
        query = "&".join(f"{key}={value}" for key, value in self.options)
        return f"{self.name}:{self.path}" + (f"?{query}" if query else "")


def parse_spec(spec: str) -> list[SourceSpec]:
    """Parse a spec string (grammar in the module docstring) into sources; weights not normalised.

    Raises:
        ValueError: empty spec or source, unknown name (listing the known ones), a missing or
            unexpected path, a weight that is not a positive number, weights on only some
            sources, or the same source twice.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(
            f"dataset spec must be a non-empty string like 'easy_vqa:0.5,shapes:0.5', got {spec!r}"
        )
    sources = [_parse_source(part.strip(), spec) for part in spec.split(",")]
    weighted = [s.weight is not None for s in sources]
    if any(weighted) and not all(weighted):
        raise ValueError(
            f"in {spec!r}: give a weight to every source or to none "
            f"(unweighted: {[s.label for s in sources if s.weight is None]})"
        )
    labels = [s.label for s in sources]
    duplicates = sorted({label for label in labels if labels.count(label) > 1})
    if duplicates:
        raise ValueError(f"in {spec!r}: sources listed more than once: {duplicates}")
    return sources


def _parse_source(part: str, spec: str) -> SourceSpec:
    if not part:
        raise ValueError(f"empty source in dataset spec {spec!r}")
    name, _, rest = part.partition(":")
    entry = _REGISTRY.get(name)
    if entry is None:
        known = ", ".join(available_datasets())
        raise ValueError(f"unknown dataset {name!r} in {spec!r}; known datasets: {known}")
    if not entry.takes_path:
        return SourceSpec(name, _parse_weight(name, rest) if rest else None)
    path, weight = rest, None
    head, _, tail = rest.rpartition(":")
    if head and _looks_numeric(tail):
        path, weight = head, _parse_weight(name, tail)
    path, _, query = path.partition("?")
    if not path:
        raise ValueError(
            f"dataset {name!r} needs a file: write {name}:PATH or {name}:PATH:WEIGHT, got {part!r}"
        )
    return SourceSpec(name, weight, path, _parse_options(name, query, entry.options) if query else ())


def _parse_options(name: str, query: str, accepted: tuple[str, ...]) -> tuple[tuple[str, str], ...]:
    options = []
    for pair in query.split("&"):
        key, equals, value = pair.partition("=")
        if not equals or not key or not value:
            raise ValueError(f"options of {name!r} are KEY=VALUE pairs joined by '&', got {pair!r}")
        if key not in accepted:
            raise ValueError(f"dataset {name!r} has no option {key!r}; it takes: {', '.join(accepted) or 'none'}")
        if key in dict(options):
            raise ValueError(f"option {key!r} of {name!r} given twice")
        options.append((key, value))
    return tuple(options)


def _looks_numeric(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _parse_weight(name: str, text: str) -> float:
    try:
        weight = float(text)
    except ValueError:
        raise ValueError(f"weight of {name!r} must be a positive number, got {text!r}") from None
    return check_weight(name, weight)


def build_dataset(
    spec: str, split: str = "train", seed: int = 0, image_size: int = 64, length: int | None = None,
    strict: bool = False,
) -> Dataset:
    """Build the dataset (or weighted :class:`Mixture`) described by ``spec``.

    Args:
        spec: e.g. ``"easy_vqa:0.5,shapes:0.3,charts:0.2"``, ``"shapes,charts"`` or
            ``"jsonl:/data/chat.jsonl:0.2,shapes:0.8"`` (grammar in the module docstring).
        split: ``"train"`` or ``"test"`` for named datasets; file datasets ignore it.
        seed: seeds synthetic rendering and the mixture's draws.
        image_size: side of synthetic images (easy-VQA and files keep their own sizes).
        length: number of samples; None: each dataset's own length (mixtures: the sum).
        strict: file datasets raise :class:`~minivlm.data.sample.DataError` on their first bad
            record instead of skipping it (``data.strict``).
    """
    sources = parse_spec(spec)
    if len(sources) == 1:
        (source,) = sources
        dataset = _build_source(source, split, seed, image_size, length, strict)
        if length is None or len(dataset) == length:
            return dataset
        return Mixture({source.label: dataset}, length=length, seed=seed)
    datasets = {s.label: _build_source(s, split, seed, image_size, None, strict) for s in sources}
    weights = {s.label: s.weight for s in sources} if sources[0].weight is not None else None
    return Mixture(datasets, weights=weights, length=length, seed=seed)


def _build_source(
    source: SourceSpec, split: str, seed: int, image_size: int, length: int | None, strict: bool = False
) -> Dataset:
    request = DatasetRequest(split, seed, image_size, length, source.path, strict, source.options)
    return _REGISTRY[source.name].factory(request)


def _synthetic(cls: type[SyntheticDataset]) -> DatasetFactory:
    def factory(request: DatasetRequest) -> Dataset:
        return cls(request.split, request.seed, request.image_size, request.length)

    return factory


register_dataset("easy_vqa", lambda request: EasyVQA(request.split))
register_dataset("easy_vqa_grouped", lambda request: EasyVQA(request.split, group_by_image=True))
register_dataset("easy_vqa_open", lambda request: EasyVQA(request.split, question_types=("shape", "color")))
register_dataset("easy_vqa_shape", lambda request: EasyVQA(request.split, question_types=("shape",)))
register_dataset("easy_vqa_color", lambda request: EasyVQA(request.split, question_types=("color",)))
register_dataset("easy_vqa_dialogues", lambda request: EasyVQADialogues(request.split, request.seed))
register_dataset("shapes", _synthetic(ShapesDataset))
register_dataset("charts", _synthetic(ChartsDataset))
register_dataset("multi_image", _synthetic(MultiImageDataset))
register_dataset("video", _synthetic(VideoDataset))
register_dataset("retrieval", _synthetic(RetrievalDataset))
for _task in (ShapesDataset, ChartsDataset, MultiImageDataset):
    register_dataset(f"{_task.task}_grouped", lambda request, task=_task: GroupedQuestions(_synthetic(task)(request)))
# Shapes grouped with count questions as the task draws them (answers 0-4 as in its test split).
register_dataset("shapes_grouped_drawn_counts",
                 lambda request: GroupedQuestions(_synthetic(ShapesDataset)(request), count_questions="drawn"))
# data.strict checks every record before training (verify): the first bad one stops the run at once.
register_dataset("jsonl", lambda request: ChatJsonlDataset(request.path, image_root=request.option("images"),
                                                           strict=request.strict, verify=request.strict),
                 takes_path=True, options=("images",))
register_dataset("llava", lambda request: LlavaJsonDataset(request.path, image_folder=request.option("images"),
                                                           strict=request.strict, verify=request.strict),
                 takes_path=True, options=("images",))
register_dataset("coco", lambda request: CocoCaptionsDataset(request.path, image_folder=request.option("images"),
                                                            strict=request.strict, verify=request.strict),
                 takes_path=True, options=("images",))


# Sharded sources (minivlm.data.shards) read their shards lazily; their libraries load on first use.
def _require(module: str, extra: str) -> None:
    import importlib.util

    if importlib.util.find_spec(module) is None:
        raise ImportError(f"{extra}: data needs the {module!r} package: pip install 'minivlm[{extra}]'")


def _webdataset(request: DatasetRequest) -> Dataset:
    _require("webdataset", "webdataset")
    from minivlm.data.webdataset_source import WebDatasetSource

    return WebDatasetSource(request.path, strict=request.strict)


def _parquet(request: DatasetRequest) -> Dataset:
    _require("pyarrow", "hf")
    from minivlm.data.parquet_source import ParquetSource

    return ParquetSource(request.path, strict=request.strict)


def _hf(request: DatasetRequest) -> Dataset:
    _require("datasets", "hf")
    from minivlm.data.parquet_source import hf_source

    return hf_source(request.path, split=request.option("split", "train"), config=request.option("config"),
                     strict=request.strict)


register_dataset("webdataset", _webdataset, takes_path=True)
register_dataset("parquet", _parquet, takes_path=True)
register_dataset("hf", _hf, takes_path=True, options=("split", "config"))
