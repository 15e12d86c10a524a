"""The captions of the benchmark figures, and the markdown of one figure (image + italic
caption) that the reports append: a leaf module, so that the reports (cost, quality) and the
figures (plots) share it without importing each other."""

CAPTIONS = {
    "cost.png": ("cost per update",
                 "Time per update of each method divided by none's, on the machine named in the title (cost.json's "
                 "machine). Solid bars: measured, median of {rounds} interleaved rounds, same model and batches; "
                 "hatched bars: the ratio the paper's Table 1 forward/backward counts predict from the measured cost "
                 "of one forward, one backward and one Adam step. Numbers on the bars: the ratio; dashed line: none "
                 "(1.0). arch (amortised) = one refresh and Tc-1 reuse updates (S={steps}, Tc={tc})."),
    "bleu_vs_time.png": ("validation BLEU vs wall-clock",
                         "Validation BLEU (greedy) after every epoch against the cost-derived wall-clock (each "
                         "epoch's updates x cost.json's s/update of the method); line: mean over seeds, shaded: "
                         "min-max over the seeds (none for n=1). Left: the methods; right: the other variants (ARCH's "
                         "ablations), with none and their base method repeated as dashed references. One colour and "
                         "marker per variant in every figure."),
    "gnorm.png": ("gradient norm per epoch",
                  "Mean global gradient norm of every epoch from epoch 2 (epoch 1's, far above the later ones for "
                  "every method, is given in the figure's note); line: mean over seeds, shaded: min-max over the "
                  "seeds. Left: the methods; right: the other variants (ARCH's ablations), with none and their base "
                  "method repeated as dashed references."),
}


def figure_lines(png: str, **fmt) -> list:
    """Markdown lines of one figure: the image, then its caption in italics (``fmt`` fills
    the caption's fields)."""
    alt, caption = CAPTIONS[png]
    return [f"![{alt}]({png})", "", f"*{caption.format(**fmt)}*", ""]
