"""Standard zero-shot benchmarks by name: class names and prompt templates built in (`limoe eval --class-names
cifar10 --templates openai`), so that a CIFAR folder or shard set needs no text files of its own.

Sources (facts, written out here):
- CIFAR-10 and CIFAR-100 class names: the datasets' own label names (`batches.meta` / `meta` of the python
  version, Krizhevsky 2009), in label order, underscores as spaces.
- Templates: "openai" is the 80-prompt ensemble of the CLIP paper's ImageNet evaluation (Radford et al. 2021),
  "openai-cifar" its 18 prompts for CIFAR, "simple" a single "a photo of a {}.".
ImageNet-1k's class names are not built in: no offline source of them ships with this project's dependencies.
"""

from __future__ import annotations

from limoe.data.stats import DataError

CIFAR10 = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")

CIFAR100 = tuple(name.replace("_", " ") for name in """
apple aquarium_fish baby bear beaver bed bee beetle bicycle bottle bowl boy bridge bus butterfly camel can castle
caterpillar cattle chair chimpanzee clock cloud cockroach couch crab crocodile cup dinosaur dolphin elephant flatfish
forest fox girl hamster house kangaroo keyboard lamp lawn_mower leopard lion lizard lobster man maple_tree motorcycle
mountain mouse mushroom oak_tree orange orchid otter palm_tree pear pickup_truck pine_tree plain plate poppy
porcupine possum rabbit raccoon ray road rocket rose sea seal shark shrew skunk skyscraper snail snake spider squirrel
streetcar sunflower sweet_pepper table tank telephone television tiger tractor train trout tulip turtle wardrobe whale
willow_tree wolf woman worm
""".split())

CLASS_NAMES = {"cifar10": CIFAR10, "cifar100": CIFAR100}

_OPENAI_CIFAR = tuple(f"a {look}photo of {article} {size}{{}}." for article in ("a", "the") for look, size in (
    ("", ""), ("blurry ", ""), ("black and white ", ""), ("low contrast ", ""), ("high contrast ", ""),
    ("bad ", ""), ("good ", ""), ("", "small "), ("", "big ")))

_OPENAI_IMAGENET = (
    "a bad photo of a {}.", "a photo of many {}.", "a sculpture of a {}.", "a photo of the hard to see {}.",
    "a low resolution photo of the {}.", "a rendering of a {}.", "graffiti of a {}.", "a bad photo of the {}.",
    "a cropped photo of the {}.", "a tattoo of a {}.", "the embroidered {}.", "a photo of a hard to see {}.",
    "a bright photo of a {}.", "a photo of a clean {}.", "a photo of a dirty {}.", "a dark photo of the {}.",
    "a drawing of a {}.", "a photo of my {}.", "the plastic {}.", "a photo of the cool {}.",
    "a close-up photo of a {}.", "a black and white photo of the {}.", "a painting of the {}.",
    "a painting of a {}.", "a pixelated photo of the {}.", "a sculpture of the {}.", "a bright photo of the {}.",
    "a cropped photo of a {}.", "a plastic {}.", "a photo of the dirty {}.", "a jpeg corrupted photo of a {}.",
    "a blurry photo of the {}.", "a photo of the {}.", "a good photo of the {}.", "a rendering of the {}.",
    "a {} in a video game.", "a photo of one {}.", "a doodle of a {}.", "a close-up photo of the {}.",
    "a photo of a {}.", "the origami {}.", "the {} in a video game.", "a sketch of a {}.", "a doodle of the {}.",
    "a origami {}.", "a low resolution photo of a {}.", "the toy {}.", "a rendition of the {}.",
    "a photo of the clean {}.", "a photo of a large {}.", "a rendition of a {}.", "a photo of a nice {}.",
    "a photo of a weird {}.", "a blurry photo of a {}.", "a cartoon {}.", "art of a {}.", "a sketch of the {}.",
    "a embroidered {}.", "a pixelated photo of a {}.", "itap of the {}.", "a jpeg corrupted photo of the {}.",
    "a good photo of a {}.", "a plushie {}.", "a photo of the nice {}.", "a photo of the small {}.",
    "a photo of the weird {}.", "the cartoon {}.", "art of the {}.", "a drawing of the {}.",
    "a photo of the large {}.", "a black and white photo of a {}.", "the plushie {}.", "a dark photo of a {}.",
    "itap of a {}.", "graffiti of the {}.", "a toy {}.", "itap of my {}.", "a photo of a cool {}.",
    "a photo of a small {}.", "a tattoo of the {}.",
)

TEMPLATES = {"simple": ("a photo of a {}.",), "openai": _OPENAI_IMAGENET, "openai-cifar": _OPENAI_CIFAR}


def is_named(value: str | None, table: dict) -> bool:
    return value is not None and value.lower() in table


def names_for_folders(names: tuple[str, ...], folders: list[str], source: str) -> list[str]:
    """The display name of each class folder: folders named by class index (`0` .. `N-1`, torchvision's and
    CLIP_benchmark's exports) or by class name (`aquarium_fish`, `aquarium fish`)."""
    if all(f.isdigit() and int(f) < len(names) for f in folders):
        return [names[int(f)] for f in folders]
    by_key = {n.lower(): n for n in names}
    unknown = [f for f in folders if f.replace("_", " ").lower() not in by_key]
    if unknown:
        raise DataError(f"class folders {unknown[:5]} are neither class indices (0..{len(names) - 1}) nor class "
                        f"names of {source}")
    return [by_key[f.replace("_", " ").lower()] for f in folders]
