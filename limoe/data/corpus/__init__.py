"""The image-text corpus: OpenMoji emoji and seven icon sets (Tabler, Font Awesome Free, Lucide, Phosphor, Material
Icons, Material Design Icons, Heroicons) rendered in eleven drawing styles from installed packages, split by concept
across all of them, with a second test of seen concepts in unseen renderings. See docs/data.md.

    root = build_corpus()                                  # once, ~50 s; cached like the built-in dataset
    train = load_corpus("train", styles=["line", "solid"]) # (image, caption drawn per epoch)
    zs, class_names, templates = corpus_zero_shot("color") # held-out concepts in one style, or "all"
    seen, seen_names, _ = corpus_zero_shot("all", split="seen")  # seen concepts in unseen renderings
"""

from limoe.data.corpus.build import CorpusConfig, build_corpus, corpus_dir
from limoe.data.corpus.dataset import CorpusPairs, corpus_captions, corpus_zero_shot, load_corpus

__all__ = ["CorpusConfig", "build_corpus", "corpus_dir", "CorpusPairs", "corpus_captions", "corpus_zero_shot",
           "load_corpus"]
