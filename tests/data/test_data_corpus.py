"""The corpus: split by concept across sources and styles, captions drawn per epoch, licences, visible renders,
filters, the command line, and a short training run on it."""

import hashlib
import io
import json
import os
from collections import defaultdict
from pathlib import Path

import pytest
from PIL import Image

from limoe.cli import main
from limoe.data import DataError
from limoe.data.corpus import CorpusConfig, CorpusPairs, build_corpus, corpus_captions, corpus_zero_shot, load_corpus
from limoe.data.corpus.build import all_items, read_rows
from limoe.data.corpus.render import MIN_COVERAGE
from limoe.data.corpus.split import MIN_RENDERINGS_FOR_SEEN, item_keys, seen_renderings, split_items
from limoe.data.sources import SOURCE_NAMES, STYLES, captions, words

SMALL = 120  # concepts in the test build: ~300 images, a few seconds


@pytest.fixture(scope="module")
def cfg(tmp_path_factory):
    return CorpusConfig(max_concepts=SMALL, cache_dir=str(tmp_path_factory.mktemp("corpus")))


@pytest.fixture(scope="module")
def root(cfg):
    return build_corpus(cfg, quiet=True)


@pytest.fixture(scope="module")
def full_split():
    return split_items(all_items(), CorpusConfig().test_fraction)  # every item, no rendering (~1 s)


def test_split_is_by_concept_across_sources_and_styles(full_split):
    s = full_split
    assert len(s.items) > 50000 and {i.source for i in s.items} == set(SOURCE_NAMES)
    assert {i.style for i in s.items} == set(STYLES)
    # No key that joins items into a concept (emoji codepoints, names, aliases) is on both sides of the split.
    names = {(i.source, i.name) for i in s.items}
    side: dict[str, set[bool]] = defaultdict(set)
    for item, concept in zip(s.items, s.concept):
        for key in item_keys(item, names):
            side[key].add(concept in s.test)
    assert all(len(v) == 1 for v in side.values())
    # Concepts do span sources: the same thing from several packages is one concept, held out or trained together.
    sources = defaultdict(set)
    for item, concept in zip(s.items, s.concept):
        sources[concept].add(item.source)
    assert sum(len(v) >= 3 for v in sources.values()) > 500
    assert 0.08 < len(s.test) / len(s.names) < 0.12


def test_matching_rule_examples(full_split):
    s = full_split
    label = {(i.source, i.style, i.key): c for i, c in zip(s.items, s.concept)}
    rocket = {label[k] for k in [("openmoji", "color", "1F680"), ("openmoji", "line", "1F680"),
                                 ("tabler", "line", "rocket"), ("lucide", "line", "rocket"),
                                 ("fontawesome", "solid", "rocket")]}
    assert len(rocket) == 1 and s.names[rocket.pop()] == "rocket"
    assert label[("tabler", "line", "ad-2")] == label[("tabler", "line", "ad")]  # a numbered variant
    assert label[("lucide", "line", "layers-2")] == label[("lucide", "line", "layers")]
    # Font Awesome's face-smile stands for the emoji 1F642 (its metadata says so).
    assert label[("fontawesome", "solid", "face-smile")] == label[("openmoji", "color", "1F642")]
    assert label[("openmoji", "color", "1F44D-1F3FD")] == label[("openmoji", "color", "1F44D")]  # tone variant
    assert words("arrow-big-left") == "arrow big left"
    # The new families: every Phosphor weight and Material style of one icon, and an MDI icon's outline twin.
    heart = {label[("phosphor", style, "heart")] for style in ("thin", "light", "line", "bold", "solid", "duotone")}
    heart |= {label[("mdi", "solid", "heart")], label[("mdi", "line", "heart-outline")],
              label[("heroicons", "line", "heart")], label[("tabler", "bold", "heart")]}
    assert heart == {label[("tabler", "line", "heart")]}
    assert len({label[("material", style, "home")] for style in ("solid", "outlined", "rounded", "sharp",
                                                                   "duotone")}) == 1
    assert label[("material", "solid", "favorite-border")] == label[("material", "solid", "favorite")]


def test_manifest_counts_and_csv_agree(root):
    manifest = json.loads((root / "manifest.json").read_text())
    for split in ("train", "test", "seen"):
        rows = read_rows(root, split)
        assert len(rows) == manifest["pairs"][split] > 0
        for by, key in (("pairs_by_source", "source"), ("pairs_by_style", "style")):
            counts = defaultdict(int)
            for r in rows:
                counts[r[key]] += 1
            assert counts == manifest[by][split]
        assert all(r["captions"][0] == r["title"] and os.path.isfile(root / r["filepath"]) for r in rows)
    assert len(manifest["pairs_by_style"]["train"]) >= 3
    train = {r["concept"] for r in read_rows(root, "train")}
    assert train.isdisjoint(r["concept"] for r in read_rows(root, "test"))


def test_seen_split_holds_out_renderings_of_trained_concepts(root):
    rows = {split: read_rows(root, split) for split in ("train", "test", "seen")}
    assert rows["seen"]
    # No rendering on two sides: every image file, and every picture, is in one split only.
    files = [r["filepath"] for split_rows in rows.values() for r in split_rows]
    assert len(files) == len(set(files))
    pictures = defaultdict(set)
    for split, split_rows in rows.items():
        for r in split_rows:
            pictures[(r["concept"], (root / r["filepath"]).read_bytes())].add(split)
    assert all(len(sides) == 1 for sides in pictures.values())
    # One rendering per seen concept, its concept trained on in at least two other renderings, never held out.
    trained = defaultdict(int)
    for r in rows["train"]:
        trained[r["concept"]] += 1
    seen = [r["concept"] for r in rows["seen"]]
    assert len(seen) == len(set(seen))
    assert all(trained[c] >= MIN_RENDERINGS_FOR_SEEN - 1 for c in seen)
    assert set(seen).isdisjoint(r["concept"] for r in rows["test"])
    # The seen zero-shot views: one class per seen concept, every seen image in the pooled view.
    pooled, classes, _ = corpus_zero_shot("all", cfg=CorpusConfig(max_concepts=SMALL, cache_dir=str(root.parent)),
                                          split="seen")
    assert len(pooled) == len(rows["seen"]) and len(classes) == len(set(seen))
    assert set(pooled.parts()) == {r["style"] for r in rows["seen"]}


def test_seen_rule_by_hand():
    concepts = ["a", "a", "a", "b", "b", "c", "c", "c", "c"]
    renderings = [f"r{i}" for i in range(len(concepts))]
    picked = seen_renderings(concepts, renderings, test_concepts={"c"}, fraction=1.0)
    # "b" has two renderings (too few to leave one out); "c" is a held-out concept; "a" gives exactly one.
    assert len(picked) == 1 and concepts[picked.pop()] == "a"
    assert seen_renderings(concepts, renderings, set(), fraction=0.0) == set()
    again = seen_renderings(concepts, renderings, set(), fraction=1.0)
    assert {concepts[i] for i in again} == {"a", "c"} and again == seen_renderings(concepts, renderings, set(), 1.0)


def test_build_is_deterministic(tmp_path):
    def digest(root):
        h = hashlib.sha256()
        for path in sorted(p for p in root.rglob("*") if p.is_file() and p.name != "manifest.json"):
            h.update(str(path.relative_to(root)).encode() + path.read_bytes())
        return h.hexdigest()

    a, b = (build_corpus(CorpusConfig(max_concepts=30, cache_dir=str(tmp_path / d)), quiet=True) for d in "ab")
    assert digest(a) == digest(b)


def test_every_source_used_has_its_licence(root):
    manifest = json.loads((root / "manifest.json").read_text())
    used = set(manifest["pairs_by_source"]["train"]) | set(manifest["pairs_by_source"]["test"])
    assert used == set(manifest["sources"]) == set(SOURCE_NAMES)  # 120 concepts draw on every source
    attribution = (root / "ATTRIBUTION.txt").read_text()
    for name in used:
        assert name in attribution
        assert (root / "LICENSES" / f"{name}.txt").read_text().strip()
    assert "OpenMoji" in (root / "LICENSES" / "openmoji.txt").read_text()
    assert "CC BY 4.0" in (root / "LICENSES" / "fontawesome.txt").read_text()


def test_renders_are_visible(root):
    for split in ("train", "test", "seen"):
        for r in read_rows(root, split):
            image = Image.open(io.BytesIO((root / r["filepath"]).read_bytes()))
            assert image.size == (64, 64)
            alpha = image.convert("RGBA").getchannel("A").histogram()
            assert 1 - alpha[0] / 64**2 >= MIN_COVERAGE, r["filepath"]


def test_captions_are_drawn_per_epoch_and_reproducibly(root):
    ds = CorpusPairs(root, "train", train=True, seed=3)
    rich = [i for i in range(len(ds)) if len(ds.captions[i]) >= 3]
    assert rich
    seen = defaultdict(set)
    for epoch in range(8):
        ds.set_epoch(epoch)
        for i in rich:
            seen[i].add(ds.caption(i))
    assert sum(len(v) >= 3 for v in seen.values()) > len(rich) / 2
    again = CorpusPairs(root, "train", train=True, seed=3)
    again.set_epoch(5)
    ds.set_epoch(5)
    assert [again.caption(i) for i in range(len(ds))] == [ds.caption(i) for i in range(len(ds))]
    # Every drawn caption names the image (or an alias of it); evaluation reads the title.
    assert all(any(c in ds.caption(i) for c in ds.captions[i]) for i in range(len(ds)))
    assert CorpusPairs(root, "test").caption(0) == CorpusPairs(root, "test").titles[0]
    # The tokenizer's captions cover every caption a pass can draw.
    assert {ds.caption(i) for i in range(len(ds))} <= set(ds.caption_texts())


def test_style_and_source_filters(root, cfg):
    line = load_corpus("train", cfg=cfg, styles=["line"])
    assert set(line.styles) == {"line"} and len(line) < len(load_corpus("train", cfg=cfg))
    emoji = load_corpus("train", cfg=cfg, sources=["openmoji"], styles=["color", "flat"])
    assert set(emoji.sources) == {"openmoji"} and set(emoji.styles) == {"color", "flat"}
    solid = set(corpus_captions(cfg=cfg, styles=["solid"]))  # the tokenizer's captions follow the filter
    assert solid < set(corpus_captions(cfg=cfg)) and all(t in solid for t in load_corpus("train", cfg=cfg,
                                                                                           styles=["solid"]).titles)
    with pytest.raises(DataError, match="styles must be some of"):
        load_corpus("train", cfg=cfg, styles=["sepia"])
    image, caption = next(iter(line))
    assert image.shape == (3, 64, 64) and isinstance(caption, str)


def test_zero_shot_views_hold_out_concepts(root, cfg):
    test = read_rows(root, "test")
    names = {r["title"] for r in test}
    pooled, classes, templates = corpus_zero_shot("all", cfg=cfg)
    assert len(pooled) == len(test) and "{}" in templates
    for view in {r["style"] for r in test}:
        ds, view_classes, _ = corpus_zero_shot(view, cfg=cfg)
        assert len(ds) == sum(r["style"] == view for r in test)
        assert set(view_classes) <= set(classes)
    assert any(c in names for c in classes)


def test_cli_builds_and_reports_counts(cfg, capsys):
    args = ["--dataset", "corpus", "--max-concepts", str(SMALL)]
    os.environ["LIMOE_CACHE"], saved = cfg.cache_dir, os.environ.get("LIMOE_CACHE")
    try:
        assert main(["data", "build", *args]) == 0
        assert main(["data", "info", *args]) == 0
    finally:
        os.environ["LIMOE_CACHE"] = saved
    out = capsys.readouterr().out
    assert "openmoji/color" in out and "tabler/line" in out and "concepts" in out


def test_a_missing_icon_package_names_its_extra():
    from limoe.extras import MissingExtraError, locate

    with pytest.raises(MissingExtraError, match=r"pip install 'limoe-torch\[data\]'"):
        locate("no_such_icon_package", "data", "the corpus")


def test_captions_say_the_name_first():
    items = [i for i in all_items() if i.source == "tabler" and i.key == "heart"]
    assert captions(items[0])[0] == "heart" and any("love" in c for c in captions(items[0]))


@pytest.mark.parametrize("in_memory", [True, False])
def test_training_runs_on_the_corpus(tmp_path, cfg, in_memory):
    from limoe.train import train

    from _train_utils import tiny_config

    run = tiny_config(tmp_path, cfg.cache_dir, steps=3, checkpoint_interval=0)
    run.data.in_memory = in_memory
    run.data.source, run.data.max_concepts, run.data.corpus_styles = "corpus", SMALL, ("line", "solid", "flat")
    run.eval.interval = 0
    result = train(run, progress=False)
    assert result.step == 3 and all(loss == loss for loss in result.losses)
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert any(any(k.startswith("zero_shot") for k in m) for m in metrics)
    # Every style is scored, the one left out of training too, and the end-of-run table lists them.
    styles = {k.rsplit("/", 1)[1] for k in result.metrics if k.startswith("zero_shot/top1/")}
    assert styles == {r["style"] for r in read_rows(Path(build_corpus(cfg)), "test")} and "color" in styles
    seen_styles = {k.rsplit("/", 1)[1] for k in result.metrics if k.startswith("seen/top1/")}
    assert seen_styles == {r["style"] for r in read_rows(Path(build_corpus(cfg)), "seen")}
    assert 0 < result.metrics["retrieval/contrastive_loss"] < 10
    table = result.table()
    assert "seen concepts top-1" in table and "held-out concepts top-1" in table
    style_rows = {line.split()[0]: line.split()[1:] for line in table.split("top-1 by style")[1].splitlines()[1:]}
    assert set(style_rows) == styles | seen_styles and all(len(cells) == 2 for cells in style_rows.values())
    if not in_memory:  # `limoe eval` of a corpus run evaluates on the corpus's held-out concepts by default
        from limoe.jobs import evaluate_checkpoint

        evaluated = evaluate_checkpoint(str(tmp_path / "run"))
        assert {"zero_shot/top1", "seen/top1", "retrieval/image_to_text/R@1"} <= set(evaluated)
        assert not any(p.name.startswith("openmoji") for p in Path(cfg.cache_dir).iterdir())  # no built-in set


def test_in_memory_batches_draw_captions_per_epoch(tmp_path, cfg):
    from limoe.data import train_tokenizer
    from limoe.train.data import make_batches

    from _train_utils import tiny_config

    run = tiny_config(tmp_path, cfg.cache_dir)
    run.data.source, run.data.max_concepts, run.data.batch_size = "corpus", SMALL, 64
    tok = train_tokenizer(corpus_captions(cfg=cfg), vocab_size=512)
    batches = make_batches(run, tok)
    stream = load_corpus("train", cfg=cfg, seed=run.seed)
    first, later = batches.batch(0, 0), batches.batch(3, 0)
    assert len(first.captions) == 64 and first.captions != later.captions
    # Each caption is one the stream draws in that epoch: the same rule, with or without memory.
    assert set(first.captions) <= {stream.caption(i, 0) for i in range(len(stream))}


@pytest.mark.parametrize("split, prefix", [("test", "zero_shot"), ("seen", "seen")])
def test_zero_shot_scores_each_style_against_every_class(root, cfg, split, prefix):
    # Reference: each image classified on its own among all of the test's classes, accuracy per style of its row.
    import torch

    import limoe
    from limoe import evaluate
    from limoe.data import ImageConfig, train_tokenizer
    from limoe.train.held_out import tokenize_fn, zero_shot

    torch.manual_seed(0)
    model = limoe.create_model("limoe-tiny", image_size=64, vocab_size=512).eval()
    tokenizer = train_tokenizer(corpus_captions(cfg=cfg), vocab_size=512)
    dataset, classes, templates = corpus_zero_shot("all", cfg=cfg, image=ImageConfig(image_size=64), split=split)
    metrics = zero_shot(model, tokenizer, dataset, classes, templates, batch_size=7, prefix=prefix)
    class_YD = evaluate.class_embeddings(model, classes, tokenize_fn(tokenizer), templates)
    hits, counts = defaultdict(int), defaultdict(int)
    for i, (image, label) in enumerate(dataset):  # in path order: evaluation streams are not shuffled
        with torch.no_grad():
            z_D = torch.nn.functional.normalize(model.encode_image(image[None]), dim=-1)[0]
        style = Path(dataset.paths[i]).name.split("-")[0]
        hits[style] += int((class_YD @ z_D).argmax() == label)
        counts[style] += 1
    assert sorted(counts) == sorted({r["style"] for r in read_rows(root, split)})
    for style in counts:
        assert metrics[f"{prefix}/top1/{style}"] == pytest.approx(hits[style] / counts[style], abs=1e-9)
    assert metrics[f"{prefix}/top1"] == pytest.approx(sum(hits.values()) / len(dataset), abs=1e-9)
    assert 0 < sum(hits.values()) < len(dataset)  # seeded: some right and some wrong, so the counts are tested


def test_caption_options_keep_the_name_and_drop_what_they_say(root):
    from limoe.data.corpus.dataset import PLAIN

    full = CorpusPairs(root, "train", train=True, seed=0)
    names = CorpusPairs(root, "train", train=True, seed=0, captions="names")
    plain = CorpusPairs(root, "train", train=True, seed=0, templates=PLAIN)
    tagged = [i for i in range(len(full)) if any(": " in c for c in full.captions[i])]
    assert tagged  # Tabler's and Font Awesome's tags
    for i in tagged:
        title = full.titles[i]
        assert not any(c.startswith((f"{title}: ", f"{title}, ")) for c in names.captions[i])
        assert full.titles[i] in names.captions[i] and len(names.captions[i]) < len(full.captions[i])
    texts = set(plain.caption_texts())
    assert not any(t.startswith(("an icon of", "an emoji of", "a drawing of", "a picture of")) for t in texts)
    for epoch in range(3):
        plain.set_epoch(epoch)
        assert all(plain.caption(i) in plain.captions[i] for i in range(len(plain)))
    with pytest.raises(DataError, match="captions must be one of"):
        CorpusPairs(root, "train", captions="tags")


def test_stroke_weights_render_the_same_icon_thinner_and_heavier():
    from limoe.data.corpus.render import render
    from limoe.data.sources import STROKE_WEIGHTS, tabler

    heart = [i for i in tabler.items() if i.key == "heart"]
    by_style = {i.style: i for i in heart}
    assert {"line", "light", "bold", "solid"} <= set(by_style) and set(STROKE_WEIGHTS) <= set(by_style)
    coverage = {style: render((by_style[style].svg_path, None, by_style[style].css, 64))[1]
                for style in ("light", "line", "bold")}
    assert coverage["light"] < coverage["line"] < coverage["bold"]  # the same drawing, more ink each time
