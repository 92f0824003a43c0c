"""lightning_prism.embedding: the picture read back pixel by pixel, and each tracker's projector data read
back with the tracker's own reader (the real TensorBoard server's HTTP API, W&B's offline run records,
MLflow's client)."""

from __future__ import annotations

import glob
import io
import json
import math
import time
import urllib.parse
from pathlib import Path

import numpy as np
import pytest
import torch
from lit_helpers import finished_records, http_get, tensorboard_server
from PIL import Image
from pytorch_lightning.loggers import CSVLogger, TensorBoardLogger

from lightning_prism.embedding import (
    MARK,
    NEUTRAL,
    PALETTE,
    embedding_plot,
    embedding_range,
    log_embedding,
    plot_area,
    projector_indices,
)
from lightning_prism.pca import principal_components
from lightning_prism.render import load_font, missing_glyphs

SIZE = (720, 480)


def pixel(coords: tuple[float, float], limit: float, size: tuple[int, int] = SIZE) -> tuple[int, int]:
    """Where plot_area's documented mapping puts a coordinate: (column, row)."""
    left, top, right, bottom = plot_area(size)
    x, y = coords
    return round(left + (x / limit + 1) / 2 * (right - left)), round(
        top + (1 - y / limit) / 2 * (bottom - top)
    )


def mask_of(image: np.ndarray, colour: tuple[int, int, int]) -> np.ndarray:
    return (image == np.array(colour, dtype=np.uint8)).all(axis=-1)


def inside_plot(mask: np.ndarray, size: tuple[int, int] = SIZE) -> np.ndarray:
    left, top, right, bottom = plot_area(size)
    out = np.zeros_like(mask)
    out[top + 1 : bottom, left + 1 : right] = mask[top + 1 : bottom, left + 1 : right]
    return out


def legend(image: np.ndarray, size: tuple[int, int] = SIZE) -> np.ndarray:
    _, top, right, _ = plot_area(size)
    return image[top:, right + 2 :]


def four_clusters(per_class: int = 50, spread: float = 0.05) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    centres = torch.tensor([[2.0, 2.0], [-2.0, 2.0], [-2.0, -2.0], [2.0, -2.0]])
    labels = torch.arange(4).repeat_interleave(per_class)
    return centres[labels] + spread * torch.randn(len(labels), 2, generator=generator), labels


# ---------------------------------------------------------------------- the picture
def test_each_class_is_drawn_in_its_colour_where_its_samples_are():
    coords, labels = four_clusters()
    image = embedding_plot(coords, labels, ["cat", "dog", "bird", "fish"], limit=4.0)
    assert image.shape == (480, 720, 3) and image.dtype == np.uint8
    rows, columns = np.indices(image.shape[:2])
    for c, centre in enumerate([(2, 2), (-2, 2), (-2, -2), (2, -2)]):
        dots = inside_plot(mask_of(image, PALETTE[c]))
        assert dots.sum() > 100, c  # 50 overlapping dots of a few pixels each
        x, y = pixel(centre, 4.0)
        assert abs(columns[dots].mean() - x) < 3 and abs(rows[dots].mean() - y) < 3, c
        assert np.hypot(columns[dots] - x, rows[dots] - y).max() < 15  # nothing of it elsewhere
    assert inside_plot(mask_of(image, PALETTE[4])).sum() == 0  # no fifth class


def test_the_legend_lists_each_class_with_its_colour_and_name():
    coords, labels = four_clusters()
    short = legend(embedding_plot(coords, labels, ["a", "b", "c", "d"], limit=4.0))
    long = legend(embedding_plot(coords, labels, ["a" * 12, "b", "c", "d"], limit=4.0))
    rows = []
    for c in range(4):
        swatch = mask_of(short, PALETTE[c])
        assert swatch.sum() > 20, c
        rows.append(np.nonzero(swatch)[0].mean())
    assert rows == sorted(rows)  # in class order, top to bottom
    dark = (short.max(axis=-1) < 80) & ~mask_of(short, MARK)
    line = int(rows[1] - rows[0])
    for r in rows:  # text to the right of every swatch
        assert dark[int(r) - line // 3 : int(r) + line // 3].sum() > 10
    dark_long = (long.max(axis=-1) < 80) & ~mask_of(long, MARK)
    first = slice(int(rows[0]) - line // 3, int(rows[0]) + line // 3)
    assert dark_long[first].sum() > 3 * dark[first].sum()  # the longer name takes more ink
    assert np.nonzero(dark_long[first])[1].max() > np.nonzero(dark[first])[1].max() + 50


def test_the_probe_images_are_ringed_in_black():
    coords, labels = four_clusters()
    marked = torch.zeros(len(labels), dtype=torch.bool)
    marked[[0, 60, 160]] = True
    image = embedding_plot(coords, labels, marked=marked, limit=4.0)
    black = inside_plot(mask_of(image, MARK))
    rows, columns = np.nonzero(black)
    centres = [pixel(tuple(coords[i].tolist()), 4.0) for i in (0, 60, 160)]
    distance = np.min([np.hypot(columns - x, rows - y) for x, y in centres], axis=0)
    assert distance.max() < 10  # every black pixel belongs to a ring around a marked sample
    for x, y in centres:
        near = np.hypot(columns - x, rows - y) < 10
        assert near.sum() > 12  # a ring round each
    unmarked = embedding_plot(coords, labels, limit=4.0)
    assert inside_plot(mask_of(unmarked, MARK)).sum() == 0
    assert mask_of(legend(image), MARK).sum() > mask_of(legend(unmarked), MARK).sum()  # "probe images"


def test_without_labels_one_colour_and_with_two_classes_two():
    coords, labels = four_clusters()
    plain = embedding_plot(coords, limit=4.0)
    assert inside_plot(mask_of(plain, NEUTRAL)).sum() > 800
    for c in range(1, 20):
        assert inside_plot(mask_of(plain, PALETTE[c])).sum() == 0
    two = embedding_plot(coords, labels % 2, ["vertical", "horizontal"], limit=4.0)
    drawn = [c for c in range(20) if inside_plot(mask_of(two, PALETTE[c])).sum() > 0]
    assert drawn == [0, 1]


def test_more_classes_than_colours_repeat_them_and_the_legend_says_so():
    coords = torch.randn(300, 2, generator=torch.Generator().manual_seed(1))
    labels = torch.arange(300) % 30
    image = embedding_plot(coords, labels)
    first, twentieth = np.nonzero(labels == 0)[0][0], np.nonzero(labels == 20)[0][0]
    assert image[pixel(tuple(coords[first].tolist()), embedding_range(coords))[::-1]].tolist() != [255] * 3
    x, y = pixel(tuple(coords[twentieth].tolist()), embedding_range(coords))
    assert mask_of(image, PALETTE[0])[y - 1 : y + 2, x - 1 : x + 2].any()  # class 20 in class 0's colour
    notes = mask_of(legend(image), (110, 110, 110))  # "+ n more classes", "colours repeat …"
    few = embedding_plot(coords, labels % 5)
    assert notes.sum() > 100 and mask_of(legend(few), (110, 110, 110)).sum() < 10  # (antialiased text)


def test_the_range_is_round_steady_and_points_beyond_sit_on_the_frame():
    assert embedding_range(np.array([[0.2, -3.1], [1.0, 0.5]])) == 4.0
    assert embedding_range(torch.tensor([[0.0, 0.0]])) == 1.0
    generator = torch.Generator().manual_seed(2)
    cloud = torch.randn(1000, 2, generator=generator)
    ranges = {embedding_range(cloud * (1 + 0.02 * epoch)) for epoch in range(5)}
    assert len(ranges) == 1  # a few per cent of growth does not move the frame
    far = torch.tensor([[100.0, 0.0], [0.0, 0.0], [0.1, 0.1]])
    image = embedding_plot(far, torch.tensor([3, 0, 0]), limit=1.0)
    right = plot_area(SIZE)[2]
    edge = mask_of(image, PALETTE[3])
    edge[:, right + 10 :] = False  # not the legend's swatch
    assert edge[:, right - 6 : right + 6].sum() == edge.sum() > 0  # drawn at the right edge
    with_nan = embedding_plot(torch.tensor([[math.nan, 0.0], [0.5, 0.5]]), torch.tensor([5, 0]), limit=1.0)
    assert mask_of(with_nan, PALETTE[5]).sum() == 0 and mask_of(with_nan, PALETTE[0]).sum() > 0


def test_the_picture_is_deterministic_and_its_text_has_glyphs():
    coords, labels = four_clusters()
    title = "epoch 3 · k-NN 0.956 · η² 0.81 · RankMe 54"
    a = embedding_plot(coords, labels, title=title, explained=torch.tensor([0.34, 0.12]))
    b = embedding_plot(coords.numpy(), labels.numpy(), title=title, explained=[0.34, 0.12])
    np.testing.assert_array_equal(a, b)
    assert missing_glyphs(title + "−0.15 PC1 (34 %)", load_font(22)) == []
    _, top, _, _ = plot_area(SIZE)
    assert (a[:top].max(axis=-1) < 80).sum() > 300  # the title is drawn above the plot
    assert not np.array_equal(a, embedding_plot(coords, labels, explained=[0.34, 0.12]))


def test_the_picture_refuses_bad_input():
    coords, labels = four_clusters()
    with pytest.raises(ValueError, match=r"expected \(N, 2\) coords, got shape \(200, 3\)"):
        embedding_plot(torch.zeros(200, 3))
    with pytest.raises(ValueError, match=r"expected \(200,\) labels, got shape \(199,\)"):
        embedding_plot(coords, labels[:199])
    with pytest.raises(ValueError, match="labels must be non-negative, got -1"):
        embedding_plot(coords, labels - 1)
    with pytest.raises(ValueError, match="labels must be integer classes, got float32"):
        embedding_plot(coords, labels.float())
    with pytest.raises(ValueError, match=r"expected \(200,\) marked"):
        embedding_plot(coords, marked=torch.zeros(3, dtype=torch.bool))
    with pytest.raises(ValueError, match="size must be at least 360×240, got 300×200"):
        embedding_plot(coords, size=(300, 200))
    with pytest.raises(ValueError, match=r"limit must be positive and finite, got 0\.0"):
        embedding_plot(coords, limit=0)
    with pytest.raises(TypeError, match="coords must be a tensor or a NumPy array, got list"):
        embedding_plot([[0.0, 0.0]])


# ---------------------------------------------------------------------- the trackers
def projector_data(count: int = 60, dim: int = 6) -> dict:
    generator = torch.Generator().manual_seed(3)
    labels = torch.arange(count) % 3
    return {
        "features": torch.randn(count, dim, generator=generator) + labels[:, None].float(),
        "labels": labels,
        "predictions": (labels + (torch.arange(count) % 5 == 0).long()) % 3,
        "class_names": ["cat", "dog\tlike", "bird"],  # a tab must not split the TSV
        "thumbnails": torch.rand(count, 3, 8, 8, generator=generator),
    }


NAMES = ["cat", "dog like", "bird"]


def test_projector_indices_spread_evenly():
    assert projector_indices(5, 10).tolist() == [0, 1, 2, 3, 4]
    assert projector_indices(10, 4).tolist() == [0, 3, 6, 9]
    picked = projector_indices(50_000, 1000)
    assert len(picked) == 1000 and picked[0] == 0 and picked[-1] == 49_999 and (picked.diff() > 0).all()


def test_tensorboard_projector_through_the_real_server(tmp_path):
    data = projector_data()
    logger = TensorBoardLogger(str(tmp_path), name="run", version=0)
    index = projector_indices(60, 40)
    for step in (3, 4):
        shifted = dict(data, features=data["features"] + step)
        assert log_embedding(logger, "prism/embedding", step=step, max_points=40, **shifted)
    logger.experiment.flush()

    with tensorboard_server(tmp_path, ["--samples_per_plugin", "images=1000"]) as server:
        base = f"{server}/data/plugin/projector"
        runs: list[str] = []
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and "run/version_0" not in runs:
            try:
                runs = json.loads(http_get(f"{base}/runs"))
            except OSError:
                time.sleep(0.5)
        assert runs == ["run/version_0"], (tmp_path / "tensorboard.log").read_text()[-2000:]
        query = urllib.parse.urlencode({"run": "run/version_0"})
        info = json.loads(http_get(f"{base}/info?{query}"))
        embeddings = {e["tensorName"]: e for e in info["embeddings"]}
        assert sorted(embeddings) == ["prism/embedding:00003", "prism/embedding:00004"]
        for step in (3, 4):
            name = f"prism/embedding:{step:05d}"
            assert embeddings[name]["tensorShape"] == [40, 6]
            args = urllib.parse.urlencode({"run": "run/version_0", "name": name})
            served = np.frombuffer(http_get(f"{base}/tensor?{args}"), dtype=np.float32).reshape(40, 6)
            np.testing.assert_array_equal(served, (data["features"][index] + step).numpy())
            lines = http_get(f"{base}/metadata?{args}").decode().splitlines()
            assert lines[0] == "class\tprediction"
            expected = [
                f"{NAMES[y]}\t{NAMES[p]}"
                for y, p in zip(
                    data["labels"][index].tolist(), data["predictions"][index].tolist(), strict=True
                )
            ]
            assert lines[1:] == expected
            sprite = np.asarray(
                Image.open(io.BytesIO(http_get(f"{base}/sprite_image?{args}"))).convert("RGB")
            )
            assert sprite.shape == (7 * 8, 7 * 8, 3)  # ⌈√40⌉ = 7 thumbnails a side
            for k in (0, 9, 39):  # thumbnail k at row k // 7, column k % 7
                r, c = divmod(k, 7)
                tile = sprite[r * 8 : (r + 1) * 8, c * 8 : (c + 1) * 8].astype(float) / 255
                reference = data["thumbnails"][index[k]].permute(1, 2, 0).numpy()
                assert np.abs(tile - reference).max() <= 1 / 255 + 1e-6


def test_tensorboard_metadata_with_one_column_has_no_header(tmp_path):
    data = projector_data(10)
    logger = TensorBoardLogger(str(tmp_path), name="run", version=0)
    log_embedding(logger, "prism/embedding", data["features"], 0, labels=data["labels"])
    (path,) = glob.glob(str(tmp_path / "run/version_0/00000/*/metadata.tsv"))
    assert Path(path).read_text().splitlines() == [str(y) for y in data["labels"].tolist()]
    large = torch.rand(9, 3, 200, 100)  # reduced to 64×64 tiles
    log_embedding(logger, "big", data["features"][:9], 1, thumbnails=large)
    (sprite,) = glob.glob(str(tmp_path / "run/version_0/00001/big/sprite.png"))
    assert Image.open(sprite).size == (3 * 64, 3 * 64)


def read_wandb_table(records: list, key: str) -> tuple[dict, dict[str, bytes]]:
    """The table W&B keeps for ``key``: its ``run_table`` artifact (``run-<id>-<key without />…``), as
    the offline run's records list it, read from W&B's staging files; and that artifact's files by path."""
    tables = []
    for record in records:
        artifact = record.artifact if record.WhichOneof("record_type") == "artifact" else None
        if artifact is not None and artifact.type == "run_table" and key.replace("/", "") in artifact.name:
            files = {c.path: Path(c.local_path).read_bytes() for c in artifact.manifest.contents}
            tables += [(json.loads(v), files) for p, v in files.items() if p.endswith(".table.json")]
    assert len(tables) == 1, [sorted(f) for _, f in tables]
    return tables[0]


def test_wandb_gets_a_table_for_its_projector(tmp_path, offline):
    wandb = pytest.importorskip("wandb")
    from pytorch_lightning.loggers import WandbLogger

    data = projector_data()
    logger = WandbLogger(project="prism", save_dir=str(tmp_path), offline=True)
    assert log_embedding(logger, "prism/embedding", step=5, max_points=40, **data)
    run_dir = Path(logger.experiment.dir).parent
    wandb.finish()

    records = finished_records(run_dir)
    table, files = read_wandb_table(records, "prism/embedding")
    assert table["columns"] == ["class", "prediction", "embedding", "image"]
    index = projector_indices(60, 40)
    rows = table["data"]
    assert [r[0] for r in rows] == [NAMES[y] for y in data["labels"][index].tolist()]
    assert [r[1] for r in rows] == [NAMES[p] for p in data["predictions"][index].tolist()]
    # The embedding: coordinates on the principal axes of the logged samples (all 6 here, fewer than 50).
    x = data["features"][index].double().numpy()
    centred = x - x.mean(axis=0)
    u, s, _ = np.linalg.svd(centred, full_matrices=False)
    embedding = np.array([r[2] for r in rows])
    assert embedding.shape == (40, 6)
    signs = np.sign((embedding * (u * s)).sum(axis=0))  # each axis up to its sign
    np.testing.assert_allclose(embedding, u * s * signs, atol=1e-4)
    for k in (0, 17, 39):
        image = (
            np.asarray(Image.open(io.BytesIO(files[rows[k][3]["path"]])).convert("RGB")).astype(float) / 255
        )
        reference = data["thumbnails"][index[k]].permute(1, 2, 0).numpy()
        assert np.abs(image - reference).max() <= 1 / 255 + 1e-6

    steps = [
        json.loads(item.value_json)
        for record in records
        if record.WhichOneof("record_type") == "history"
        for item in record.history.item
        if item.key == "trainer/global_step" or list(item.nested_key) == ["trainer/global_step"]
    ]
    assert steps == [5]


def test_wandb_embedding_has_at_most_fifty_dimensions():
    class FakeWandb:  # WandbLogger's log_table, recorded: recognised by class name
        pass

    FakeWandb.__name__ = "WandbLogger"
    logger = FakeWandb()
    calls = []
    logger.log_table = lambda **kwargs: calls.append(kwargs)
    features = torch.randn(80, 300, generator=torch.Generator().manual_seed(4))
    assert log_embedding(logger, "e", features, 2, labels=torch.zeros(80, dtype=torch.long))
    (call,) = calls
    assert call["columns"] == ["class", "embedding"] and call["step"] == 2
    embedding = torch.tensor([row[1] for row in call["data"]])
    expected = principal_components(features.reshape(80, 300, 1, 1), 50).scores.reshape(80, 50)
    torch.testing.assert_close(embedding, expected)


def test_mlflow_gets_the_projectors_tsv_files(tmp_path, offline):
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient
    from pytorch_lightning.loggers import MLFlowLogger

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    logger = MLFlowLogger("prism", tracking_uri=uri, artifact_location=str(tmp_path / "artifacts"))
    data = projector_data()
    assert log_embedding(logger, "prism/embedding", step=7, max_points=40, **data)
    client = MlflowClient(tracking_uri=uri)
    listed = sorted(a.path for a in client.list_artifacts(logger.run_id, "prism/embedding/step_00007"))
    assert listed == ["prism/embedding/step_00007/metadata.tsv", "prism/embedding/step_00007/tensors.tsv"]
    local = Path(client.download_artifacts(logger.run_id, "prism/embedding/step_00007", str(tmp_path / "dl")))
    index = projector_indices(60, 40)
    tensors = np.loadtxt(local / "tensors.tsv", delimiter="\t", dtype=np.float32)
    np.testing.assert_array_equal(tensors, data["features"][index].numpy())  # float32 read back exactly
    lines = (local / "metadata.tsv").read_text().splitlines()
    assert lines[0] == "class\tprediction"
    assert lines[1:] == [
        f"{NAMES[y]}\t{NAMES[p]}"
        for y, p in zip(data["labels"][index].tolist(), data["predictions"][index].tolist(), strict=True)
    ]


def test_other_loggers_take_nothing_and_bad_input_is_refused(tmp_path):
    data = projector_data(10)
    logger = CSVLogger(str(tmp_path))
    assert log_embedding(logger, "prism/embedding", data["features"], 0) is False
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == []
    tb = TensorBoardLogger(str(tmp_path), name="tb")
    with pytest.raises(TypeError, match="features must be a floating-point tensor, got list"):
        log_embedding(tb, "e", [[0.0]], 0)
    with pytest.raises(ValueError, match=r"expected \(M, D\) features, got shape \(10,\)"):
        log_embedding(tb, "e", data["features"][:, 0], 0)
    with pytest.raises(ValueError, match=r"expected \(10,\) labels, got shape \(9,\)"):
        log_embedding(tb, "e", data["features"], 0, labels=data["labels"][:9])
    with pytest.raises(
        ValueError, match=r"expected \(10 or 4, 1 or 3, h, w\) thumbnails, got shape \(10, 2, 8, 8\)"
    ):
        log_embedding(tb, "e", data["features"], 0, thumbnails=torch.rand(10, 2, 8, 8), max_points=4)
    with pytest.raises(ValueError, match="max_points must be a positive integer, got 0"):
        log_embedding(tb, "e", data["features"], 0, max_points=0)


def test_the_embedding_view_keeps_its_axes_and_its_frame_from_pass_to_pass():
    from lightning_prism.embedding import EmbeddingView, embedding_range

    generator = torch.Generator().manual_seed(0)
    first = torch.randn(40, 6, generator=generator) * torch.tensor([5.0, 2.0, 1.0, 0.5, 0.2, 0.1])
    view = EmbeddingView()
    assert view.picture(first[:1], None, None, "one", None) is None  # nothing to draw
    picture = view.picture(first, torch.arange(40) % 3, None, "first", ["a", "b", "c"])
    assert picture.ndim == 3 and picture.dtype == np.uint8
    axes, limit = view.axes.clone(), view.limit
    assert axes.shape == (6, 2) and limit >= embedding_range((first - first.mean(0)) @ axes)
    # Half the spread and the order of the samples turned around: the same axes (aligned with the
    # previous pass's), and a frame that does not shrink; the probe's points ringed on them.
    second = first.flip(0) * 0.5
    view.picture(second, None, (second[:4], None), "second", None)
    torch.testing.assert_close(view.axes, axes, atol=1e-5, rtol=0)
    assert view.limit == limit
