"""Apache Beam runner: the same stage and dedup functions as the local runner, as a Beam
pipeline, so a corpus that outgrows one machine runs on Dataflow, Flink or Spark
(runner.beam_runner and runner.beam_options pass straight to Beam's PipelineOptions).

  shards -> FilterShard (stages.Curator, one per worker) -> docs
  docs -> batched dedup keys -> exact: group by exact hash, all but the first are dropped
       -> near: survivors grouped by (band, band key) -> candidate edges -> one union-find
          over the edges (dedup.cluster_edges; edges are few, documents never travel there)
  docs - dropped -> grouped by input shard -> one output shard each, in input order
Results equal the local runner's byte for byte: the decisions depend only on order keys.
"""
from __future__ import annotations

import json

from jaxllm.curate import checks, dedup, io, report
from jaxllm.curate.config import CurateConfig
from jaxllm.curate.report import Stats
from jaxllm.curate.stages import Curator, keys_for
from jaxllm.curate.text import words


def _beam_open(path: str, mode: str):
    from apache_beam.io.filesystem import CompressionTypes
    from apache_beam.io.filesystems import FileSystems
    if "w" in mode:
        return FileSystems.create(path, compression_type=CompressionTypes.UNCOMPRESSED)
    return FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED)


def _list_shards(cfg: CurateConfig) -> list[str]:
    from apache_beam.io.filesystems import FileSystems
    if all("://" not in p for p in cfg.input.paths):
        return io.list_shards(cfg.input)   # the same glob rules as the local runner
    found = sorted({m.path for r in FileSystems.match(list(cfg.input.paths)) for m in r.metadata_list})
    if not found:
        raise io.InputError(f"input.paths {list(cfg.input.paths)} matched no files")
    return found


def _group_edges(kv):
    """Edges (first, other) of one group of documents sharing a band key."""
    members = sorted(kv[1])
    return [(members[0], m) for m in members[1:]]


def _batch_keys(records, cfg: CurateConfig):
    k = keys_for(list(records), cfg)
    for i in range(k.order.size):
        yield (int(k.order[i]), int(k.exact[i]), tuple(int(x) for x in k.bands[i]), bool(k.has_sig[i]))


def _dedup_stats(_, n_keys: int, n_exact: int, near, cfg: CurateConfig) -> Stats:
    s = Stats()
    report.count_dedup(s, n_keys, n_exact, len(near[0]), cfg)
    return s


def run(cfg: CurateConfig, log=print) -> dict:
    import apache_beam as beam
    from apache_beam.io.filesystems import FileSystems
    from apache_beam.options.pipeline_options import PipelineOptions

    class FilterShard(beam.DoFn):
        def __init__(self, cfg):
            self.cfg = cfg

        def setup(self):
            self.curator = Curator(self.cfg)

        def process(self, task):
            i, path = task
            stats = Stats()
            kept = []   # held until the shard is read to its end: a damaged one gives nothing
            try:
                for rec in io.read_shard(path, i, self.cfg.input, stats.counts, _beam_open):
                    doc = self.curator.process(rec, stats)
                    if doc is not None:
                        kept.append(doc)
            except io.BadShardError as e:
                if not self.cfg.input.skip_bad_shards:
                    raise
                stats, kept = Stats(), []
                stats.skip(path, e.cause)
            yield from kept
            yield beam.pvalue.TaggedOutput("stats", stats)

    def write_shard(kv, n: int):
        i, groups = kv
        docs = sorted(groups["docs"], key=lambda r: r.order)
        stats = Stats()
        for r in docs:
            stats.observe("words_output", len(words(r.text)))
        path = FileSystems.join(cfg.output.dir, io.output_name(i, n, cfg.output))
        stats.add("output/docs", io.write_shard(path, (r.to_json() for r in docs), cfg.output, _beam_open))
        return stats

    shards = _list_shards(cfg)
    checks.preflight(cfg, shards)
    n = len(shards)
    try:
        FileSystems.mkdirs(cfg.output.dir)
    except IOError:
        pass   # already there
    # Shards of an earlier run would look like output; only names this runner makes go.
    stale = [m.path for r in FileSystems.match([FileSystems.join(cfg.output.dir, "part-*")])
             for m in r.metadata_list if io.is_output_name(m.path.rstrip("/").rsplit("/", 1)[-1])]
    if stale:
        FileSystems.delete(stale)
        log(f"curate (beam): removed {len(stale)} part-*-of-* shards of an earlier run "
            f"from {cfg.output.dir}")
    opts = PipelineOptions([f"--runner={cfg.runner.beam_runner}", *cfg.runner.beam_options])
    d = cfg.dedup
    with beam.Pipeline(options=opts) as p:
        filtered = (p | "Shards" >> beam.Create(list(enumerate(shards))) | "Spread" >> beam.Reshuffle()
                    | "Filter" >> beam.ParDo(FilterShard(cfg)).with_outputs("stats", main="docs"))
        docs = filtered.docs
        keys = (docs | "Batch" >> beam.BatchElements(min_batch_size=1, max_batch_size=512)
                | "Keys" >> beam.FlatMap(_batch_keys, cfg))
        if d.exact:
            exact_removed = (keys | "ByExact" >> beam.Map(lambda k: (k[1], k[0]))
                             | "GroupExact" >> beam.GroupByKey()
                             | "ExactDrop" >> beam.FlatMap(lambda kv: dedup.first_of_group(kv[1])[1]))
        else:
            exact_removed = p | "NoExact" >> beam.Create([])
        survivors = ({"k": keys | "KeyByOrder" >> beam.Map(lambda k: (k[0], k)),
                      "x": exact_removed | "MarkExact" >> beam.Map(lambda o: (o, 1))}
                     | "JoinExact" >> beam.CoGroupByKey()
                     | "Survivors" >> beam.FlatMap(lambda kv: [] if kv[1]["x"] else list(kv[1]["k"])))
        if d.minhash:
            edges = (survivors | "HasSig" >> beam.Filter(lambda k: k[3])
                     | "ByBand" >> beam.FlatMap(lambda k: [((b, key), k[0]) for b, key in enumerate(k[2])])
                     | "GroupBand" >> beam.GroupByKey() | "Edges" >> beam.FlatMap(_group_edges))
            near = (edges | "AllEdges" >> beam.combiners.ToList()
                    | "UnionFind" >> beam.Map(dedup.cluster_edges))
        else:
            near = p | "NoNear" >> beam.Create([([], 0)])
        near_removed = near | "NearDrop" >> beam.FlatMap(lambda r: r[0])
        drop = ((exact_removed, near_removed) | "Drops" >> beam.Flatten()
                | "MarkDrop" >> beam.Map(lambda o: (o, 1)))
        final = ({"d": docs | "DocByOrder" >> beam.Map(lambda r: (r.order, r)), "x": drop}
                 | "JoinDrop" >> beam.CoGroupByKey()
                 | "Kept" >> beam.FlatMap(lambda kv: [] if kv[1]["x"] else list(kv[1]["d"])))
        write_stats = ({"docs": final | "ByShard" >> beam.Map(lambda r: (r.order >> 32, r)),
                        "all": p | "ShardIds" >> beam.Create([(i, None) for i in range(n)])}
                       | "GroupShard" >> beam.CoGroupByKey() | "Write" >> beam.Map(write_shard, n))
        n_keys = keys | "CountKeys" >> beam.combiners.Count.Globally()
        n_exact = exact_removed | "CountExact" >> beam.combiners.Count.Globally()
        dedup_stats = (p | "One" >> beam.Create([None])
                       | "DedupStats" >> beam.Map(_dedup_stats, beam.pvalue.AsSingleton(n_keys),
                                                  beam.pvalue.AsSingleton(n_exact),
                                                  beam.pvalue.AsSingleton(near), cfg))
        _ = ((filtered.stats, write_stats, dedup_stats) | "AllStats" >> beam.Flatten()
             | "Merge" >> beam.CombineGlobally(Stats.merged)
             | "Report" >> beam.Map(_write_report, beam.pvalue.AsSingleton(near), n, cfg))
    with _beam_open(FileSystems.join(cfg.output.dir, "report.json"), "rb") as f:
        rep = json.loads(f.read())
    for sk in rep["input"]["skipped_shards"]:
        log(f"curate (beam): skipped input {sk['path']} ({sk['error']}) as "
            f"input.skip_bad_shards=true asks")
    log(f"curate (beam): {rep['input']['records']} records -> {rep['output']['docs']} documents; "
        f"report in {cfg.output.dir}/report.json")
    return rep


def _write_report(stats: Stats, near, n_shards: int, cfg: CurateConfig) -> None:
    rep = report.summary(stats, n_shards, stats.counts["output/docs"], near[1])
    report.write(cfg.output.dir, rep, cfg.report.histograms, _beam_open)
