"""Figures drawn on matplotlib Figures without pyplot, so that importing them changes no backend;
matplotlib itself is imported with the first figure, so that the commands that draw none start
without it. The 4x4 grid of images, each with a title, that training, evaluate and the report draw.
"""

from companions.training.files import write_atomically

FIGURE_INCHES, FIGURE_DPI = 6, 100  # every 4x4 figure is 600x600 pixels


def display_pixels(image, dataset):
    """A normalised 1 x 28 x 28 tensor back to 0..1 pixels for display."""
    return (image.float().cpu().squeeze(0) * dataset.std + dataset.mean).clamp(0, 1).numpy()


def grid_title(predicted, truth, classes, confidence=None):
    """'pred 7', or 'pred 3 (true 5)' when wrong, with the confidence if given; two lines when long."""
    title = f"pred {classes[predicted]}"
    if predicted != truth:
        title += f" (true {classes[truth]})"
    if confidence is not None:
        title += f" {100 * confidence:.1f} %"
    return title if len(title) <= 20 else title.replace(" (", "\n(", 1)


def has_long_names(dataset):
    """Whether the class names need slanted tick labels to fit side by side."""
    return max(map(len, dataset.classes)) > 2


def new_figure(width, height):
    """A matplotlib Figure of width x height inches. matplotlib is imported with the first figure,
    so that the commands that draw none start without it."""
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height))


def save_figure(figure, path):
    write_atomically(path, lambda file: figure.savefig(file, format="png", dpi=FIGURE_DPI))


def plot_digit_grid(images, titles, heading, path, dataset, title_colors=None, title_size=10):
    """A 4x4 grid of images under a heading, with a title above each image."""
    figure = new_figure(FIGURE_INCHES, FIGURE_INCHES)
    figure.suptitle(heading)
    for index, axis in enumerate(figure.subplots(4, 4).flat):
        axis.axis("off")
        axis.set(xticks=[], yticks=[])  # none are drawn anyway; without them the layout is found faster
        if index < len(images):
            axis.imshow(display_pixels(images[index], dataset), cmap="gray", vmin=0, vmax=1)
            axis.set_title(titles[index], fontsize=title_size, color=(title_colors or ["black"] * 16)[index])
    figure.tight_layout()
    save_figure(figure, path)
