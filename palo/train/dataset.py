"""The training data path: PALO/LLaVA JSON -> supervised examples -> padded batches.

One clear path: :class:`LazySupervisedDataset` reads one sample by byte offset (:mod:`palo.data.json_index`, so
the 13 GB PALO file is never held in memory and dataloader workers share nothing but numpy arrays), builds ids and
labels from the rendered template (:mod:`palo.train.preprocess`), loads and preprocesses its image, and
:class:`DataCollator` pads a batch. Per-sample metadata for filtering and length grouping (``corrupt`` flags,
modality lengths, languages) comes from one pass over the file, cached next to it.

With ``--packing True`` :class:`PackedDataCollator` replaces :class:`DataCollator`: the same samples per step, but
several share a row up to ``--model_max_length`` positions (images counted at their spliced size), with
``position_ids`` restarting at each sample, so the model keeps attention within samples (see
:mod:`palo.model.multimodal`). The sampler, the number of samples per optimizer step and the loss (a mean over the
batch's answer tokens) are those of the padded recipe; only the padding goes.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import multiprocessing as mp
import os
import zipfile
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from palo.constants import IGNORE_INDEX, IMAGE_TOKEN_INDEX
from palo.data.json_index import JsonArrayIndex, cache_paths, cache_writer, content_fingerprint
from palo.data.languages import LANGUAGES, sample_language
from palo.mm_utils import ImageLoadError, load_image, preprocess_image
from palo.model.multimodal import ids_within, spliced_length
from palo.train.preprocess import BadSampleError, build_supervised_example

logger = logging.getLogger(__name__)

LANGUAGE_NAMES = (*LANGUAGES, "other")
_META_VERSION = 3  # 3: languages from merge's label and the reweighed detector (palo.data.languages)


class OverLengthSample(BadSampleError):
    """A sample over ``--model_max_length`` under ``--over_length skip``: skipped and counted, never an error."""


@dataclass
class SampleMeta:
    """Per-sample facts from one pass over the data, in file order.

    Attributes:
        corrupt: ``corrupt: true`` (dropped from training, as in the original).
        has_image: The sample names an image.
        words: Whitespace word count over all turns (the original's length for grouping).
        language: Index into :data:`LANGUAGE_NAMES`, detected from the text's script.
        invalid_json: The entry is not valid JSON (the index checks only the array's structure, not what is inside
            each element); its other fields are those of an empty sample.
    """

    corrupt: np.ndarray
    has_image: np.ndarray
    words: np.ndarray
    language: np.ndarray
    invalid_json: np.ndarray


def _meta_of(sample: Any) -> tuple[bool, bool, int, int]:
    if not isinstance(sample, dict):
        return False, False, 0, LANGUAGE_NAMES.index("other")
    turns = sample.get("conversations") or []
    words = sum(len(str(t.get("value", "")).split()) for t in turns if isinstance(t, dict))
    return (
        bool(sample.get("corrupt", False)),
        "image" in sample,
        words,
        LANGUAGE_NAMES.index(sample_language(sample)),
    )


def _meta_range(args: tuple[JsonArrayIndex, int, int]) -> list[tuple[bool, bool, int, int, bool]]:
    index, start, stop = args
    rows = []
    for i in range(start, stop):
        try:
            sample = index.read(i)
        except ValueError:  # flagged, and named by check_invalid_json before the model loads
            rows.append((*_meta_of(None), True))
            continue
        rows.append((*_meta_of(sample), False))
    return rows


def _map_ranges(func: Any, n: int, *prefix: Any, workers: int | None = None) -> list[Any]:
    """``func((*prefix, start, stop))`` over ranges covering ``0..n``, concatenated in order.

    One pass over a data file: in forked processes for large files (the file's pages are shared, nothing is pickled
    but the results), in this process for small ones.
    """
    workers = workers or min(8, os.cpu_count() or 1)
    step = max(1, -(-n // (workers * 4)))
    ranges = [(*prefix, s, min(n, s + step)) for s in range(0, n, step)]
    if workers > 1 and n > 2000:
        with mp.get_context("fork").Pool(workers) as pool:
            parts = pool.map(func, ranges)
    else:
        parts = [func(r) for r in ranges]
    return [x for part in parts for x in part]


def scan_metadata(index: JsonArrayIndex, path: str, workers: int | None = None) -> SampleMeta:
    """Metadata of every sample, computed in parallel once and cached as ``<path>.meta.npz`` (in the user cache for
    a read-only data folder)."""
    stat = os.stat(path)
    caches = cache_paths(path, suffix=".meta.npz")  # beside the data, else (read-only data) the user cache
    key = np.array([_META_VERSION, stat.st_size, stat.st_mtime_ns, content_fingerprint(path, stat)], dtype=np.int64)
    for cache in filter(os.path.isfile, caches):
        try:
            with np.load(cache) as data:
                if np.array_equal(data["key"], key):
                    return SampleMeta(data["corrupt"], data["has_image"], data["words"], data["language"],
                                      data["invalid_json"])
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):  # damaged: rebuilt, not trusted
            pass
    rows = _map_ranges(_meta_range, len(index), index, workers=workers)
    meta = SampleMeta(
        corrupt=np.array([r[0] for r in rows], dtype=bool),
        has_image=np.array([r[1] for r in rows], dtype=bool),
        words=np.array([r[2] for r in rows], dtype=np.int64),
        language=np.array([r[3] for r in rows], dtype=np.int8),
        invalid_json=np.array([r[4] for r in rows], dtype=bool),
    )
    with cache_writer(caches) as f:
        np.savez(f, key=key, corrupt=meta.corrupt, has_image=meta.has_image, words=meta.words, language=meta.language,
                 invalid_json=meta.invalid_json)
    return meta


def check_invalid_json(index: JsonArrayIndex, meta: SampleMeta, skip_bad_samples: bool) -> np.ndarray:
    """The entries of the data file that are not valid JSON (``meta.invalid_json``), checked: cheap, so a training
    run calls it before loading its model.

    Args:
        index: The data file's index.
        meta: Its metadata (:func:`scan_metadata`).
        skip_bad_samples: Whether such entries are skipped (and counted) rather than an error.

    Returns:
        Their positions in the file, in order.

    Raises:
        BadSampleError: Unless ``skip_bad_samples``, when there is one: its message names the file, the first such
            sample and the byte where it stops being JSON.
    """
    invalid = np.flatnonzero(meta.invalid_json)
    if len(invalid) and not skip_bad_samples:
        try:
            index.read(int(invalid[0]))
            message = f"{index.path}: sample {invalid[0]} is not valid JSON"  # as scanned (a cached scan)
        except ValueError as exc:  # the index's own message: the file, the sample, the byte and why
            message = str(exc)
        more = f" (and {len(invalid) - 1} more samples)" if len(invalid) > 1 else ""
        raise BadSampleError(f"{message}{more} (pass --skip_bad_samples True to skip and count such samples)")
    return invalid


_LENGTHS_VERSION = 1
_LENGTHS_OF: LazySupervisedDataset | None = None  # the dataset forked length workers measure


def _length_range(bounds: tuple[int, int]) -> list[int]:
    dataset = _LENGTHS_OF
    assert dataset is not None
    # An entry that is not JSON counts 1 position, as any sample that cannot be built (it is never trained).
    return [1 if dataset.meta.invalid_json[i] else dataset._length_of(dataset.index.read(i)) for i in range(*bounds)]


class LazySupervisedDataset(Dataset):
    """PALO/LLaVA training samples, read lazily by byte offset.

    Args:
        data_path: The training JSON (one array).
        tokenizer: The LLM tokenizer.
        template: Conversation template key (``--version``; ``v0``/``v0.5`` mean ``v0``).
        image_folder: Folder image paths are relative to.
        image_processor: CLIP processor (None for a text-only run).
        image_aspect_ratio: ``pad`` or ``square``.
        mm_use_im_start_end: Wrap ``<image>`` in start/end tokens.
        model_max_length: Maximum positions per sample, image rows included.
        image_tokens: LLM positions one image takes (576, 144 with LDP).
        over_length: ``truncate`` (to the ids whose spliced positions fit, so the labels are the ones the model
            trains on) or ``skip`` samples longer than ``model_max_length``.
        skip_bad_samples: Skip and count bad samples instead of raising.
        index: ``data_path``'s index, when the caller built it already (to check the file before loading a model).
        meta: Its metadata (:func:`scan_metadata`), when the caller scanned it already (likewise).

    Raises:
        FileNotFoundError: ``data_path`` is not a file.
        BadSampleError: An entry is not valid JSON, unless ``skip_bad_samples`` (:func:`check_invalid_json`).
    """

    def __init__(
        self,
        data_path: str,
        tokenizer: Any,
        template: str,
        image_folder: str | None = None,
        image_processor: Any = None,
        image_aspect_ratio: str = "square",
        mm_use_im_start_end: bool = False,
        model_max_length: int = 2048,
        image_tokens: int = 576,
        over_length: str = "truncate",
        skip_bad_samples: bool = False,
        index: JsonArrayIndex | None = None,
        meta: SampleMeta | None = None,
    ) -> None:
        if not os.path.isfile(data_path):
            raise FileNotFoundError(f"--data_path {data_path}: no such file")
        self.index = index if index is not None else JsonArrayIndex.build(data_path)
        self.meta = meta if meta is not None else scan_metadata(self.index, data_path)
        invalid = check_invalid_json(self.index, self.meta, skip_bad_samples)
        if len(invalid):
            logger.warning("skipped %d entries of %s that are not valid JSON (the first: entry %d)", len(invalid),
                           data_path, invalid[0])
        self.keep = np.nonzero(~self.meta.corrupt & ~self.meta.invalid_json)[0]
        filtered = int(self.meta.corrupt.sum())
        # The original printed the count always; a warning only when something was dropped.
        logger.log(logging.WARNING if filtered else logging.INFO,
                   "Filtered %d conversations (corrupt: true); %d remain.", filtered, len(self.keep))
        self.num_filtered = filtered
        self.tokenizer = tokenizer
        self.template = template
        self.image_folder = image_folder or ""
        self.image_processor = image_processor
        self.image_aspect_ratio = image_aspect_ratio
        self.mm_use_im_start_end = mm_use_im_start_end
        self.model_max_length = model_max_length
        self.image_tokens = image_tokens
        self.over_length = over_length
        self.skip_bad_samples = skip_bad_samples
        # Shared across forked dataloader workers, so the counts are global; entries that are not JSON count from here.
        self.bad_samples = mp.get_context("fork").Value("i", len(invalid))
        self.over_length_skipped = mp.get_context("fork").Value("i", 0)  # --over_length skip
        # Per dataset slot, whether it was skipped (1 bad, 2 over length): each counted once a run, however often
        # it is drawn, and passed over without being read again.
        self._skipped = mp.get_context("fork").Array("b", len(self.keep), lock=False)
        self._stride = replacement_stride(len(self.keep))
        self.data_path = data_path
        self._token_lengths: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.keep)

    @property
    def lengths(self) -> list[int]:
        """Word count per sample, plus 128 for image samples (the original's ``lengths``)."""
        m = self.meta
        return (m.words[self.keep] + 128 * m.has_image[self.keep]).tolist()

    @property
    def modality_lengths(self) -> list[int]:
        """Word count per sample, negative for text-only samples (for ``group_by_modality_length``)."""
        m = self.meta
        # At least 1: a sample without words (an empty or missing conversation) still needs a length to be grouped;
        # it is named, or skipped, when it is read (the sampler refused a 0, naming no sample).
        words = np.maximum(m.words[self.keep], 1)
        return np.where(m.has_image[self.keep], words, -words).tolist()

    def _load_image(self, sample: dict) -> torch.Tensor:
        if isinstance(sample["image"], (list, tuple, dict)) or sample["image"] is None:
            # Lists of images (newer LLaVA data): PALO's format has one image per sample (docs/formats.md §5.1).
            raise BadSampleError(f"'image' must be one file name, not {type(sample['image']).__name__} "
                                 f"{str(sample['image'])[:80]}: PALO trains on one image per sample")
        path = os.path.join(self.image_folder, str(sample["image"]))  # a number names a file as the original read it
        return preprocess_image(load_image(path), self.image_processor, self.image_aspect_ratio)

    def token_lengths(self) -> np.ndarray:
        """Positions each sample takes in the model (images spliced in, capped at ``model_max_length``).

        Exact, unlike :attr:`lengths` (word counts): every sample is tokenized once, without loading its image, and
        the result cached next to the data file (``<path>.lengths-<key>.npy``, keyed by the file, the tokenizer and
        every setting that changes a length). A sample that cannot be built counts 1 position: at training time
        it is skipped (``--skip_bad_samples``) or stops the run.

        Returns:
            ``[len(self)]`` int64, in dataset order.
        """
        if self._token_lengths is not None:
            return self._token_lengths
        stat = os.stat(self.data_path)
        fingerprint = hashlib.sha256(repr((
            _LENGTHS_VERSION, stat.st_size, stat.st_mtime_ns, content_fingerprint(self.data_path, stat),
            type(self.tokenizer).__name__,
            sorted(self.tokenizer.get_vocab().items()), self.template, self.mm_use_im_start_end, self.image_tokens,
            self.model_max_length, self.over_length, self.image_processor is not None,
        )).encode()).hexdigest()[:16]
        caches = cache_paths(self.data_path, suffix=f".lengths-{fingerprint}.npy")
        lengths = None
        for cache in filter(os.path.isfile, caches):
            with contextlib.suppress(OSError, ValueError, EOFError):  # damaged: rebuilt, not trusted
                lengths = np.load(cache)
                if lengths.shape == (len(self.meta.corrupt),):
                    break
        if lengths is None or lengths.shape != (len(self.meta.corrupt),):
            lengths = self._compute_lengths()
            with cache_writer(caches) as f:  # as the metadata cache
                np.save(f, lengths)
        self._token_lengths = lengths[self.keep].astype(np.int64)
        return self._token_lengths

    def _compute_lengths(self) -> np.ndarray:
        """Spliced length of every entry of the file (``corrupt`` ones included, so the cache is per file)."""
        global _LENGTHS_OF
        n = len(self.meta.corrupt)
        logger.info("Tokenizing %d samples once to measure their lengths (for --packing_rows)", n)
        _LENGTHS_OF = self  # read by the forked workers: the tokenizer is not pickled
        try:
            return np.asarray(_map_ranges(_length_range, n), dtype=np.int64)
        finally:
            _LENGTHS_OF = None

    def _length_of(self, sample: Any) -> int:
        try:
            input_ids, _ = self.tokenize(sample)
        except BadSampleError:
            return 1
        return min(spliced_length(input_ids, self.image_tokens), self.model_max_length)

    def tokenize(self, sample: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """``(input_ids, labels)`` of one sample, checked (raises :class:`BadSampleError`); no image is read."""
        if not isinstance(sample, dict) or not isinstance(sample.get("conversations"), list):
            raise BadSampleError("no 'conversations' list")
        has_image = "image" in sample
        if has_image and self.image_processor is None:
            raise BadSampleError("has an image but the run has no --vision_tower")
        example = build_supervised_example(
            sample["conversations"], self.tokenizer, self.template, has_image, self.mm_use_im_start_end
        )
        input_ids = torch.tensor(example.input_ids, dtype=torch.long)
        labels = torch.tensor(example.labels, dtype=torch.long)
        num_images = int((input_ids == IMAGE_TOKEN_INDEX).sum())
        if has_image and num_images != 1:
            raise BadSampleError(f"an image sample needs exactly one <image> placeholder, found {num_images}")
        length = spliced_length(input_ids, self.image_tokens)
        if length > self.model_max_length:
            if self.over_length == "skip":
                raise OverLengthSample(f"{length} positions is over --model_max_length {self.model_max_length}")
            # Truncation happens after splicing (in the model); what must not happen is silently losing every
            # supervised token, which would train on nothing.
            supervised = (labels != IGNORE_INDEX).nonzero()
            first = int(supervised[0]) if len(supervised) else len(labels)
            # The first answer token lands after everything before it, spliced.
            first_spliced = spliced_length(input_ids[:first], self.image_tokens)
            if first_spliced >= self.model_max_length:
                raise BadSampleError(
                    f"after truncation to --model_max_length {self.model_max_length} no answer token is left"
                )
            # Cut here what the model would cut after splicing: the Trainer divides the loss by the labelled tokens
            # it counts in the batch, which must be the ones the model trains on, not the cut-off ones too.
            keep = ids_within(input_ids, self.image_tokens, self.model_max_length)
            input_ids, labels = input_ids[:keep], labels[:keep]
        return input_ids, labels

    def build(self, sample: dict) -> dict[str, Any]:
        """One sample as tensors (raises :class:`BadSampleError` or ``ImageLoadError`` on bad data)."""
        input_ids, labels = self.tokenize(sample)
        item: dict[str, Any] = {"input_ids": input_ids, "labels": labels}
        # Truncation may have cut the placeholder (an image past --model_max_length): what is left is text that comes
        # before the image and never attends to it, so it trains text-only. Loading the image anyway gave its batch
        # one image more than placeholders (an error, or another sample's image spliced in its place).
        if "image" in sample and bool((input_ids == IMAGE_TOKEN_INDEX).any()):
            item["image"] = self._load_image(sample)
        return item

    def __getitem__(self, i: int) -> dict[str, Any]:
        # A skipped sample's place goes to the slot a stride further on (then two strides ...): a run of k skipped
        # neighbours hands its places to k different samples (the next sample each took all of them: in a file
        # sorted by length with an over-length tail, one sample filled most of the epoch). The stride is prime to
        # the size, so every slot is tried before the data is called all bad; the choice depends on i alone, so a
        # resumed run draws the same samples.
        for attempt in range(len(self.keep)):
            slot = (i + attempt * self._stride) % len(self.keep)
            if self._skipped[slot]:
                continue
            position = int(self.keep[slot])
            sample = self.index.read(position)
            try:
                item = self.build(sample)
            except (BadSampleError, ImageLoadError) as exc:
                sample_id = sample.get("id", "?") if isinstance(sample, dict) else "?"
                message = f"bad training sample id={sample_id!r} (entry {position} of the data file): {exc}"
                # --over_length skip skips what it names whatever --skip_bad_samples says (it stopped the run).
                over_length = isinstance(exc, OverLengthSample)
                if not (self.skip_bad_samples or over_length):
                    raise BadSampleError(message + " (pass --skip_bad_samples True to skip and count "
                                                   "such samples)") from exc
                counter = self.over_length_skipped if over_length else self.bad_samples
                with counter.get_lock():  # another dataloader worker may have skipped it meanwhile
                    first = not self._skipped[slot]
                    if first:
                        self._skipped[slot] = 2 if over_length else 1
                        counter.value += 1
                if first and not over_length:  # expected by whoever asked for it: counted at the end, named once
                    logger.warning("skipped %s", message)
                continue
            item["language"] = int(self.meta.language[position])
            return item
        raise BadSampleError("every sample of the data file is bad")


@dataclass
class DataCollator:
    """Pads ids (pad id) and labels (IGNORE_INDEX) on the right; stacks the images of image samples.

    Text-only samples carry no dummy image: the model runs one blank image through CLIP and the projector itself
    when a batch has none (see ``PaloForCausalLM.forward``), not one per sample.
    """

    pad_token_id: int

    def __call__(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        width = max(len(x["input_ids"]) for x in items)
        batch = len(items)
        input_ids = torch.full((batch, width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((batch, width), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((batch, width), dtype=torch.long)
        for row, item in enumerate(items):
            n = len(item["input_ids"])
            input_ids[row, :n] = item["input_ids"]
            labels[row, :n] = item["labels"]
            attention_mask[row, :n] = 1
        out: dict[str, Any] = {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}
        images = [x["image"] for x in items if "image" in x]
        if images:
            out["images"] = torch.stack(images)
        out["languages"] = torch.tensor([x.get("language", len(LANGUAGE_NAMES) - 1) for x in items], dtype=torch.long)
        return out


def replacement_stride(size: int) -> int:
    """The step between a skipped sample's slot and its replacement's: about 0.618 of ``size`` (so neighbours'
    replacements lie far apart and apart from each other), made prime to ``size`` (so stepping visits every slot)."""
    stride = max(1, round(size * 0.6180339887))
    while math.gcd(stride, size) != 1:
        stride += 1
    return stride


def pack_rows(lengths: list[int], capacity: int) -> list[list[int]]:
    """Group sample indices into as few rows of at most ``capacity`` positions as possible, balanced in length.

    The batch is as wide as its longest row, so the rows should be few *and* even: with ``R`` the fewest rows the
    total length allows, samples go longest first to the shortest row (LPT); if one does not fit, ``R`` grows by one.
    A sample of ``capacity`` positions or more gets a row of its own (the model truncates it there, as without
    packing).

    Args:
        lengths: Spliced length of each sample (image rows counted).
        capacity: Positions per row (``--model_max_length``).

    Returns:
        Rows of indices into ``lengths``, each in decreasing length; deterministic for the same lengths.
    """
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])  # stable: ties keep the sampler's order
    alone = [[i] for i in order if lengths[i] >= capacity]
    rest = [i for i in order if lengths[i] < capacity]
    count = -(-sum(lengths[i] for i in rest) // capacity)
    while rest:
        rows: list[list[int]] = [[] for _ in range(count)]
        loads = [0] * count
        for i in rest:
            r = loads.index(min(loads))
            if loads[r] + lengths[i] > capacity:
                break
            rows[r].append(i)
            loads[r] += lengths[i]
        else:
            return alone + rows
        count += 1
    return alone


@dataclass
class PackedDataCollator:
    """Packs a batch's samples into as few rows as fit ``max_length`` spliced positions each.

    Each row is its samples' ids back to back, then padding; ``position_ids`` count from 0 in each sample (0 on
    padding) and mark where samples start; ``packed`` tells the model so. Each sample's first label is
    ``IGNORE_INDEX`` (it always is for PALO's templates: a BOS token), so no sample is trained to follow the one
    before it. Images are stacked in the order their placeholders appear in the packed rows; ``languages`` holds
    one entry per sample in the same row-major order.

    Args:
        pad_token_id: Id on padding positions.
        max_length: Positions per row (``--model_max_length``).
        image_tokens: Positions one image takes in the model (576 for CLIP-L/336, 144 with LDP; 0 for text-only).
    """

    pad_token_id: int
    max_length: int
    image_tokens: int

    def spliced_length(self, item: dict[str, Any]) -> int:
        """Positions ``item`` takes in a row (:func:`palo.model.multimodal.spliced_length`)."""
        return spliced_length(item["input_ids"], self.image_tokens)

    def planned_rows(self, items: list[dict[str, Any]], lengths: list[int]) -> list[list[int]] | None:
        """The rows the sampler planned (``--packing_rows``: each item's ``pack_row``), if they still fit.

        None when the items carry no plan, or when a row of several samples overflows ``max_length`` (a bad sample
        replaced by the next one at load time has another length): then the batch is packed here instead.
        """
        tags = [item.get("pack_row") for item in items]
        if any(tag is None for tag in tags):
            return None
        rows: dict[int, list[int]] = {}
        for i, tag in enumerate(tags):
            rows.setdefault(int(tag), []).append(i)
        planned = list(rows.values())
        if any(len(row) > 1 and sum(lengths[i] for i in row) > self.max_length for row in planned):
            return None
        return planned

    def __call__(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        lengths = [self.spliced_length(x) for x in items]
        rows = self.planned_rows(items, lengths) or pack_rows(lengths, self.max_length)
        width = max(sum(len(items[i]["input_ids"]) for i in row) for row in rows)
        input_ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
        position_ids = torch.zeros((len(rows), width), dtype=torch.long)
        images: list[torch.Tensor] = []
        languages: list[int] = []
        for r, row in enumerate(rows):
            start = 0
            for i in row:
                item = items[i]
                n = len(item["input_ids"])
                input_ids[r, start:start + n] = item["input_ids"]
                labels[r, start:start + n] = item["labels"]
                labels[r, start] = IGNORE_INDEX
                attention_mask[r, start:start + n] = 1
                position_ids[r, start:start + n] = torch.arange(n)
                if "image" in item:
                    images.append(item["image"])
                languages.append(item.get("language", len(LANGUAGE_NAMES) - 1))
                start += n
        out: dict[str, Any] = {
            "input_ids": input_ids,
            "labels": labels,
            "attention_mask": attention_mask,
            "position_ids": position_ids,
            "packed": True,
        }
        if images:
            out["images"] = torch.stack(images)
        out["languages"] = torch.tensor(languages, dtype=torch.long)
        return out


class RowTaggedDataset(Dataset):
    """A dataset read by ``(index, row)`` keys: the item comes back with ``pack_row = row``.

    The ``--packing_rows`` batch sampler (:class:`palo.train.sampler.PackedStepSampler`) plans which samples share
    a row; this carries the plan through the DataLoader (and its worker processes) to :class:`PackedDataCollator`.
    """

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, key: tuple[int, int]) -> dict[str, Any]:
        index, row = key
        item = dict(self.dataset[index])
        item["pack_row"] = row
        return item
