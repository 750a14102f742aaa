# Whole-slide segmentation: the slides, their inputs and outputs (included by wsi.smk).
# Slides: the synthetic demo slide(s), or the user's slide sheet (wsi.slides).
import re

from omniseg.wsi.sheet import load_slide_sheet
from omniseg.steps.slides import scale_keys

WSI = config["wsi"]
#: Scale keys of the tissue table ("0.25", "1", "2"): one prediction job per slide and scale.
WSI_SCALES = scale_keys(TISSUES)
#: What every slide gets in results/wsi/{slide}/.
WSI_EXPORTS = ["labels.ome.tif", "overlay.png", "tissues.geojson", "areas.csv"]


def wsi_slides():
    """Slide id -> path, mpp, mask image, truth, stain: the synthetic demo slides or the slide
    sheet (validated while the DAG is built; file existence only; a stain for every slide
    where wsi.stain_norm is on)."""
    if WSI["slides"] == "synthetic":
        return {
            f"synth_{i}": {
                "path": f"results/slides/synth_{i}.tif",
                "mpp": None,
                "mask": "",
                "truth": f"results/slides/synth_{i}_truth.h5",
                "stain": WSI["synthetic"]["stain"],
            }
            for i in range(WSI["synthetic"]["count"])
        }
    sheet = load_slide_sheet(
        WSI["slides"], check_files=True, require_stain=WSI["stain_norm"]
    )
    return {
        row["slide_id"]: {k: row[k] for k in ("path", "mpp", "mask", "truth", "stain")}
        for row in sheet.to_dict(orient="records")
    }


SLIDES = wsi_slides()


def _wsi_methods():
    """(the exported method, the methods scored on slides with ground truth), validated."""
    method = WSI["method"]
    if method not in METHODS:
        raise ValueError(
            f"wsi.method {method!r} is not a configured method ({', '.join(METHODS)})"
        )
    scored = WSI.get("methods") or list(METHODS)
    unknown = [m for m in scored if m not in METHODS]
    if unknown:
        raise ValueError(
            f"wsi.methods names {', '.join(unknown)}, not configured methods "
            f"({', '.join(METHODS)})"
        )
    return method, list(dict.fromkeys(scored))


#: The method whose label maps are exported, and the methods scored on slides with truth.
WSI_METHOD, WSI_SCORED = _wsi_methods()


def get_wsi_models(wildcards):
    """The model file(s) of the slide's method: one network, or one per tissue."""
    return models_of(wildcards.method)


def get_wsi_probs(wildcards):
    return expand(
        "results/wsi/{slide}/{method}/prob_{scale}.h5",
        slide=wildcards.slide,
        method=wildcards.method,
        scale=WSI_SCALES,
    )


def slide_scores():
    """Score tables of every (slide with truth, scored method)."""
    return [
        f"results/wsi/{slide}/{method}/scores.csv"
        for slide, entry in SLIDES.items()
        if entry["truth"]
        for method in WSI_SCORED
    ]


def wsi_rules():
    """The aggregation rules of the config: nested pairs and the conflict policy."""
    agg = WSI["aggregation"]
    return {"nested": agg["nested"], "conflict": agg["conflict"]}


def get_wsi_slide(wildcards):
    return SLIDES[wildcards.slide]["path"]


def get_wsi_mpp(wildcards):
    return SLIDES[wildcards.slide]["mpp"]


def get_wsi_mask_image(wildcards):
    mask = SLIDES[wildcards.slide]["mask"]
    return [mask] if mask else []


def get_wsi_truth(wildcards):
    return SLIDES[wildcards.slide]["truth"]


def get_wsi_stain_name(wildcards):
    return SLIDES[wildcards.slide]["stain"]


def get_wsi_stain_file(wildcards):
    """The slide's stain.json where wsi.stain_norm is on; nothing where it is off."""
    return [f"results/wsi/{wildcards.slide}/stain.json"] if WSI["stain_norm"] else []


def get_synthetic_slide(wildcards):
    """Generator arguments of one synthetic slide: wsi.synthetic, the seed offset by its index."""
    args = {k: v for k, v in WSI["synthetic"].items() if k != "count"}
    index = int(wildcards.slide.rsplit("_", 1)[1])
    return {**args, "seed": args["seed"] + index}


def wsi_outputs():
    """Exports of every slide, and the slide table where slides have ground truth."""
    files = []
    for slide in SLIDES:
        files += expand("results/wsi/{slide}/{name}", slide=slide, name=WSI_EXPORTS)
    if slide_scores():
        files += ["results/tables/slides.csv", "results/tables/slides.md"]
    return files
