"""TFDS builders over local files: JSONL/Parquet + a layout → array_record splits.

TensorFlow is not needed: ``tfds.core.GeneratorBasedBuilder`` writes ``array_record``
files and ``builder.as_data_source()`` reads them back by index (random access, no
``tf.data``). Records keep their file order (``disable_shuffling``), so index ``i`` of a
split is the ``i``-th kept record of its files, and ``iteration.EpochIterator`` gives the
seeded, resumable, per-host order over those indices.

The build is keyed by a fingerprint of (layout, files with sizes and mtimes, validation
settings): the same inputs reuse the prepared data; changed inputs build anew. Each
split's ``ReadReport`` is saved in the dataset's metadata.

    result = build_dataset({"train": ["uf.parquet"]}, "ultrafeedback", "~/data")
    train = load_split(result.builder, "train")
    train[0]  # {"id", "prompt", "chosen", "rejected", ...}
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import pathlib
import re
from collections.abc import Mapping, Sequence

from jaxalign.data.layouts import PAIR_LAYOUTS, get_layout
from jaxalign.data.records import DataError, ReadReport, iter_records, resolve_path

BUILDER_VERSION = "1.0.0"
_CANONICAL = ("id", "prompt", "chosen", "rejected")


def _tfds():
    """``tensorflow_datasets`` with its array_record reader, or an error saying what to install."""
    try:
        import tensorflow_datasets as tfds
    except ImportError as e:
        raise DataError(
            f"TFDS builders need tensorflow-datasets ({e}); `pip install tensorflow-datasets "
            "array-record` (TensorFlow itself is not needed), or read the files directly "
            "with jaxalign.data.records.read_records"
        ) from None
    try:
        import array_record  # noqa: F401
    except ImportError:
        raise DataError(
            "TFDS array_record datasets need the array_record package: `pip install "
            "array-record`, or read the files directly with jaxalign.data.records.read_records"
        ) from None
    return tfds


def encode_example(record: dict) -> dict[str, str]:
    """Canonical record → TFDS example of text features.

    ``prompt`` is stored as JSON (a string or a message list); fields other than
    id/prompt/chosen/rejected go, as JSON, into ``extra``.
    """
    extra = {k: v for k, v in record.items() if k not in _CANONICAL}
    example = {
        "id": str(record["id"]),
        "prompt": json.dumps(record["prompt"], ensure_ascii=False),
        "extra": json.dumps(extra, ensure_ascii=False, default=str),
    }
    if "chosen" in record:
        example["chosen"] = record["chosen"]
        example["rejected"] = record["rejected"]
    return example


def decode_example(example: Mapping) -> dict:
    """TFDS example (text as bytes) → the canonical record ``encode_example`` stored."""

    def text(v) -> str:
        return v.decode("utf-8") if isinstance(v, bytes) else str(v)

    record = json.loads(text(example["extra"]))
    record["id"] = text(example["id"])
    record["prompt"] = json.loads(text(example["prompt"]))
    if "chosen" in example:
        record["chosen"] = text(example["chosen"])
        record["rejected"] = text(example["rejected"])
    return record


def fingerprint(files: Mapping[str, Sequence[pathlib.Path]], layout: str, **settings) -> str:
    """A short hash of (layout, settings, each file's path, size and mtime)."""
    h = hashlib.sha256(json.dumps([layout, sorted(settings.items())], default=str).encode())
    for split in sorted(files):
        for path in files[split]:
            stat = path.stat()
            h.update(f"{split}|{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode())
    return h.hexdigest()[:12]


def _make_builder_class():
    tfds = _tfds()

    class LocalPreferenceData(tfds.core.GeneratorBasedBuilder):
        """Local JSONL/Parquet files in one layout, materialised as array_record splits."""

        VERSION = tfds.core.Version(BUILDER_VERSION)
        # Nothing is downloaded, so there is no checksums file beside the code; locating
        # one would import importlib_resources, which tensorflow-datasets does not declare.
        code_path = None

        def __init__(self, *, files, layout, on_bad_record, max_chars, **kwargs):
            self._files = files
            self._layout = layout
            self._on_bad_record = on_bad_record
            self._max_chars = max_chars
            super().__init__(**kwargs)

        def _info(self):
            text = tfds.features.Text()
            fields = {"id": text, "prompt": text, "extra": text}
            if self._layout in PAIR_LAYOUTS:
                fields.update(chosen=text, rejected=text)
            return tfds.core.DatasetInfo(
                builder=self,
                description=f"local files, layout {self._layout!r}",
                features=tfds.features.FeaturesDict(fields),
                disable_shuffling=True,  # index i = i-th kept record, in file order
                metadata=tfds.core.MetadataDict(),
            )

        def _split_generators(self, dl_manager):
            return {split: self._generate_examples(split) for split in self._files}

        def _generate_examples(self, split):
            report = ReadReport(", ".join(str(p) for p in self._files[split]))
            index = 0
            for path in self._files[split]:
                for record in iter_records(
                    path, self._layout, self._on_bad_record, self._max_chars, report
                ):
                    yield index, encode_example(record)
                    index += 1
            self.info.metadata[f"report_{split}"] = report.to_dict()

    return LocalPreferenceData


def quiet_tfds() -> None:
    """Hides TFDS's progress bars and its per-build info logging (for command-line use)."""
    import logging

    _tfds().disable_progress_bar()
    logging.getLogger("absl").setLevel(logging.ERROR)


_BUILDER_CLASS = None


def builder_class():
    """The TFDS builder class (created once, on first use, so importing needs no TFDS)."""
    global _BUILDER_CLASS
    if _BUILDER_CLASS is None:
        _BUILDER_CLASS = _make_builder_class()
    return _BUILDER_CLASS


@dataclasses.dataclass
class BuildResult:
    """A prepared dataset: the TFDS ``builder`` and each split's ``ReadReport``."""

    builder: object
    reports: dict[str, ReadReport]

    @property
    def data_dir(self) -> pathlib.Path:
        return pathlib.Path(str(self.builder.data_dir))


def build_dataset(
    files: Mapping[str, str | Sequence[str]],
    layout: str,
    data_dir: str | pathlib.Path,
    name: str = "local",
    on_bad_record: str = "error",
    max_chars: int | None = None,
) -> BuildResult:
    """Materialises ``{split: file(s)}`` in ``layout`` as array_record under ``data_dir``.

    ``name`` (letters, digits, ``_``) plus the inputs' fingerprint names the build, so
    preparing the same inputs again only reopens them. ``"demo"`` as a file stands for the
    packaged demo pairs (pair layouts) or prompts. Bad records stop the build or are
    skipped and counted, as in ``records.read_records``.
    """
    get_layout(layout)
    if not files:
        raise DataError("build_dataset needs at least one split, e.g. {'train': 'pairs.jsonl'}")
    kind = "pairs" if layout in PAIR_LAYOUTS else "prompts"
    paths = {
        split: [
            resolve_path(str(f), kind) for f in ([fs] if isinstance(fs, str | pathlib.Path) else fs)
        ]
        for split, fs in files.items()
    }
    for split in paths:
        if not re.fullmatch(r"[a-z][a-z0-9_]*", split):
            raise DataError(f"split name {split!r}: use lower-case letters, digits and '_'")
    if not re.fullmatch(r"[A-Za-z0-9_]+", name):
        raise DataError(f"dataset name {name!r}: use letters, digits and '_'")
    tfds = _tfds()
    key = fingerprint(paths, layout, on_bad_record=on_bad_record, max_chars=max_chars)
    config = tfds.core.BuilderConfig(name=f"{name}_{layout}_{key}", version=BUILDER_VERSION)
    builder = builder_class()(
        files=paths,
        layout=layout,
        on_bad_record=on_bad_record,
        max_chars=max_chars,
        config=config,
        data_dir=str(pathlib.Path(data_dir).expanduser()),
        file_format="array_record",
    )
    builder.download_and_prepare()
    metadata = builder.info.metadata or {}
    reports = {
        split: ReadReport.from_dict(metadata[f"report_{split}"])
        for split in paths
        if f"report_{split}" in metadata
    }
    return BuildResult(builder, reports)


class RecordSource:
    """Random access to a prepared split's canonical records: ``len(s)``, ``s[i]``."""

    def __init__(self, data_source):
        self._source = data_source

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index: int) -> dict:
        n = len(self._source)
        if not -n <= index < n:
            raise IndexError(f"record {index} out of range for a split of {n}")
        return decode_example(self._source[index % n])

    def __iter__(self):
        for i in range(len(self)):
            yield self[i]

    def take(self, indices: Sequence[int]) -> list[dict]:
        """The records at ``indices`` (e.g. one step's share from ``EpochIterator``)."""
        return [self[int(i)] for i in indices]


def load_split(builder, split: str = "train") -> RecordSource:
    """The records of ``split`` of a prepared builder, via ``as_data_source`` (no TensorFlow)."""
    sources = builder.as_data_source()
    if split not in sources:
        raise DataError(f"split {split!r} not built; available: {', '.join(sorted(sources))}")
    return RecordSource(sources[split])
