"""Slices per second from :class:`covidseg.dataset.SliceDataset` against two references.

- ``per_item_decode``: a naive dataset that decodes the study's ``.nii.gz`` (nibabel), checks and
  preprocesses it for *every* item, then returns the slice: what a dataset without a cache does.
- ``slice_dataset``: the package's dataset (each study decoded once, kept as one ``(Z, H, W)``
  array; an item copies one slice out of it).
- ``slice_dataset_loader``: the same through ``DataLoader(batch_size, shuffle=True)``, as
  :func:`covidseg.training.fit` reads it.
- ``memcpy``: a plain copy of the same bytes (the float32 slice and its uint8 mask) into
  preallocated buffers, the floor for any in-memory dataset.

Items are visited in a seeded random order (a shuffled epoch). The naive dataset is timed on a
subset of the items (it is slow); every figure is a rate, slices per second. Before timing, the
naive dataset's items are checked to be bit-identical to ``SliceDataset``'s.

Usage::

    python benchmarks/data.py              # 128 px phantom, 3 studies
    python benchmarks/data.py --size 512   # MosMedData's in-plane size
"""

from __future__ import annotations

import argparse
import sys

import _common
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from covidseg.dataset import SliceDataset, load_study_slices
from covidseg.mosmed import annotated_studies

STUDY_IDS = (255, 256, 257, 258, 259, 260)
TARGET_SPEEDUP = 20.0


class PerItemDecodeDataset(Dataset):
    """The naive reference: decode and preprocess the whole study for every item."""

    def __init__(self, studies, counts):
        self.studies = list(studies)
        self._index = [(i, k) for i, n in enumerate(counts) for k in range(n)]

    def __len__(self):
        return len(self._index)

    def __getitem__(self, index):
        position, k = self._index[index]
        entry = load_study_slices(self.studies[position])
        image = torch.from_numpy(np.array(entry.images[k], dtype=np.float32, copy=True))[None]
        mask = torch.from_numpy(entry.masks[k].astype(np.float32))[None]
        return image, mask


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=128, help="in-plane size of the phantom studies (default 128)")
    parser.add_argument("--studies", type=int, default=3, help=f"studies to load (at most {len(STUDY_IDS)})")
    parser.add_argument("--naive-items", type=int, default=12, help="items the naive dataset decodes per timed call")
    parser.add_argument("--batch-size", type=int, default=16, help="DataLoader batch size (the quick preset's)")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--min-seconds", type=float, default=0.5, help="shortest timed call of the fast variants")
    parser.add_argument("--quick", action="store_true", help="2 studies, 3 repeats")
    _common.add_results_argument(parser, "data")
    args = parser.parse_args(argv)
    if args.quick:
        args.studies, args.repeat = 2, 3
    machine = _common.machine_info()

    ids = STUDY_IDS[: args.studies]
    studies = annotated_studies(_common.bench_phantom(args.size, ids), ids)
    dataset = SliceDataset(studies)
    naive = PerItemDecodeDataset(studies, [dataset.slice_counts[s.study_id] for s in studies])
    n = len(dataset)
    order = np.random.default_rng(0).permutation(n)
    naive_order = order[: args.naive_items]
    for i in naive_order[:3]:  # the reference returns exactly what SliceDataset does
        for a, b in zip(naive[int(i)], dataset[int(i)]):
            assert torch.equal(a, b), "naive and SliceDataset items differ"

    # memcpy: the same bytes, copied into preallocated buffers
    stores = [(s.images, s.masks) for s in dataset.studies]
    located = [dataset.locate(int(i)) for i in order]
    image_buffer = np.empty(dataset.studies[0].images.shape[1:], np.float32)
    mask_buffer = np.empty(dataset.studies[0].masks.shape[1:], np.uint8)

    def memcpy(passes=1):
        for _ in range(passes):
            for position, k in located:
                np.copyto(image_buffer, stores[position][0][k])
                np.copyto(mask_buffer, stores[position][1][k])

    def slice_dataset(passes=1):
        for _ in range(passes):
            for i in order:
                dataset[int(i)]

    def slice_dataset_loader(passes=1):
        for _ in range(passes):
            loader = DataLoader(dataset, batch_size=args.batch_size, shuffle=True, generator=torch.Generator().manual_seed(0))
            for _ in loader:
                pass

    def per_item_decode(passes=1):
        for i in naive_order:
            naive[int(i)]

    # fast variants repeat the epoch so that one timed call lasts at least --min-seconds
    passes = {name: _common.passes_for(fn, args.min_seconds) for name, fn in
              (("slice_dataset", slice_dataset), ("slice_dataset_loader", slice_dataset_loader), ("memcpy", memcpy))}
    passes["per_item_decode"] = 1
    functions = {"per_item_decode": per_item_decode, "slice_dataset": slice_dataset, "slice_dataset_loader": slice_dataset_loader, "memcpy": memcpy}
    variants = {name: (lambda fn=fn, k=passes[name]: fn(k)) for name, fn in functions.items()}
    work = {name: float(passes[name] * n) for name in functions}
    work["per_item_decode"] = float(len(naive_order))
    timings = _common.time_interleaved(variants, repeat=args.repeat, warmup=1)
    over_naive = _common.paired_ratios(timings, "per_item_decode", work)
    over_memcpy = _common.paired_ratios(timings, "memcpy", work)
    slice_bytes = image_buffer.nbytes + mask_buffer.nbytes
    results = {
        "settings": {
            "phantom_size_px": args.size,
            "studies": list(ids),
            "slices": n,
            "naive_items_per_call": len(naive_order),
            "epochs_per_call": passes,
            "batch_size": args.batch_size,
            "bytes_per_item": slice_bytes,
            "repeat": args.repeat,
        },
        "slices_per_s": {name: round(work[name] / t.median, 1) for name, t in timings.items()},
        "timings": {name: t.to_dict(per=work[name], unit="slices_per_s") for name, t in timings.items()},
        "speedup_over_per_item_decode": {k: over_naive[k] for k in ("slice_dataset", "slice_dataset_loader", "memcpy")},
        "fraction_of_memcpy_rate": {k: over_memcpy[k] for k in ("slice_dataset", "slice_dataset_loader", "per_item_decode")},
        "target": {"speedup_over_per_item_decode": TARGET_SPEEDUP, "met": over_naive["slice_dataset"]["median"] >= TARGET_SPEEDUP},
        "notes": "Rates are slices per second (image and mask). Speed-ups are medians of per-round ratios of the interleaved runs.",
    }
    _common.write_results(args.results_name, results, machine)
    for name, rate in results["slices_per_s"].items():
        print(f"{name:<22} {rate:12.1f} slices/s")
    print(f"SliceDataset / per-item decoding: {over_naive['slice_dataset']['median']:.0f}x "
          f"(rounds {over_naive['slice_dataset']['min']:.0f}..{over_naive['slice_dataset']['max']:.0f}x)")
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
