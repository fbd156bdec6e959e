"""DPO's data path on several hosts: each reads and tokenises only its share of a pair file.

On several hosts (``jax.distributed``) every host holds the whole batch list by default
and feeds its own rows of each (fine for SPA's and PLE's small per-round sets). For a
large pair file, :func:`read_host_pairs` and :func:`host_pair_batches` let each host read
and tokenise only its share: the hosts agree on one batch plan, each builds only the rows
it feeds (``jaxalign.loop.train(..., host_local=True)``), and every host still runs the
same sequence of identically shaped global batches.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from jaxalign import parallel
from jaxalign.data import pairs as pair_data
from jaxalign.data.records import DataError, ReadReport, kept_record_index, read_record_share


def read_host_pairs(
    path: str, mesh, batch_size: int, on_bad_record: str = "error", layout: str = "pairs"
) -> tuple[list[dict], np.ndarray, ReadReport]:
    """This host's share of a pair file, each record's global index, and all hosts' report.

    Host share ``q`` of ``Q`` (:func:`jaxalign.parallel.data_shard`) keeps records
    ``q, q + Q, ...``; processes that feed the same rows read the same share. The index
    of a record is its place among the whole file's kept records, as one host reading
    everything would number it. A bad record found by any host stops every host with the
    message one host reading everything would give: that of the earliest bad record.
    All processes must call this together.
    """
    share, shares = parallel.data_shard(mesh, batch_size)
    error = None
    try:
        records, positions, report = read_record_share(
            path, layout, on_bad_record, shard=(share, shares)
        )
    except DataError as e:  # the other hosts must hear of it, not wait for this one
        error = {"message": str(e), "position": -1 if e.position is None else e.position}
        records, positions, report = [], np.zeros(0, np.int64), ReadReport(path)
    hosts = parallel.allgather_json(
        {
            "share": share,
            "error": error,
            "report": report.to_dict(),
            "total": report.read + report.others,
        }
    )
    errors = [h["error"] for h in hosts if h["error"]]
    if errors:
        first = min(errors, key=lambda e: e["position"])  # -1: the file itself is at fault
        raise DataError(first["message"], first["position"] if first["position"] >= 0 else None)
    one_per_share = {h["share"]: h for h in hosts}
    total = ReadReport.combine(
        [ReadReport.from_dict(one_per_share[q]["report"]) for q in sorted(one_per_share)]
    )
    if total.skipped == 0:  # nothing skipped: a record's index is its position in the file
        return records, positions, total
    # Which positions were kept is spread over the hosts: gather each share's kept mask.
    count = hosts[0]["total"]
    mask = np.zeros(math.ceil(count / shares), np.uint8)  # uint8: collectives know it
    mask[(positions - share) // shares] = 1
    masks = parallel.allgather_array(mask)
    by_share = {h["share"]: masks[q] for q, h in enumerate(hosts)}
    index = kept_record_index([by_share[q] for q in range(shares)], count)
    return records, index[positions], total


def host_pair_batches(
    records: Sequence[dict], indices: Sequence[int], tokenizer, config, mesh
) -> tuple[list[dict], pair_data.PairReport]:
    """This host's rows of the pair batches that all hosts run together, and the summed report.

    ``records``/``indices`` from :func:`read_host_pairs`. Every host tokenises and
    buckets only its records; from all hosts' bucket counts they agree on one plan
    (:func:`jaxalign.data.pairs.plan_pair_batches`), so batch ``k`` has the same shape on
    every host. Each batch has ``len(process_rows(mesh, batch_size))`` rows, weight-0
    padding where this host has no pair left; ``index`` holds global record indices.
    Train on them with ``train(..., host_local=True)``. All processes call this together.
    """
    batch_size = config.train.batch_size
    rows = len(parallel.process_rows(mesh, batch_size))
    share, _ = parallel.data_shard(mesh, batch_size)
    by_bucket, report = pair_data.bucket_pairs(
        records,
        tokenizer,
        max_prompt_tokens=config.data.max_prompt_tokens,
        max_response_tokens=config.data.max_response_tokens,
        use_chat_template=config.data.use_chat_template,
        indices=indices,
    )
    hosts = parallel.allgather_json({"share": share, "rows": rows, "report": report.to_dict()})
    if len({h["rows"] for h in hosts}) != 1:
        raise ValueError(
            f"processes feed different numbers of rows per batch ({[h['rows'] for h in hosts]}); "
            "use a mesh whose data x fsdp blocks spread evenly over the processes"
        )
    one_per_share = {h["share"]: pair_data.PairReport.from_dict(h["report"]) for h in hosts}
    plan = pair_data.plan_pair_batches([r.buckets for r in one_per_share.values()], rows)
    batches = pair_data.pack_pair_batches(by_bucket, plan, rows, pair_data.pad_token_id(tokenizer))
    total = pair_data.PairReport.combine([one_per_share[q] for q in sorted(one_per_share)])
    total.padding_pairs = len(plan) * batch_size - total.kept
    return batches, total
