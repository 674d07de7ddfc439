"""Write small LeRobot-format datasets (v2.1 or v3.0) from episodes: test fixtures and the output of our own
demonstration generators. `data/lerobot.py` reads them back, and the layout follows LeRobot's own writer (see that
module's docstring for the format facts).

What is written:

- `meta/info.json` with the five LeRobot bookkeeping features (timestamp, frame_index, episode_index, index,
  task_index) beside ours; video features carry LeRobot's `info` block (codec, pixel format, size, fps).
- v2.1: `meta/episodes.jsonl`, `meta/tasks.jsonl`, `meta/episodes_stats.jsonl` (LeRobot 2.1 will not load a
  dataset without it), one parquet per episode, one MP4 per camera and episode.
- v3.0: `meta/episodes/chunk-000/file-000.parquet`, `meta/tasks.parquet` (written through pandas when it is
  installed, so that LeRobot's `load_tasks` finds the task strings as the frame's index), `meta/stats.json`, data
  and videos grouped `episodes_per_file` episodes per file (all in one by default), one parquet row group per
  episode, each video file one continuous stream whose episodes start at `from_timestamp`.
- Images as PNG in the parquet's Hugging Face `Image` struct {bytes, path} (`image_storage="image"`) or as yuv420p
  video encoded by PyAV (`"video"`); the parquet schema carries the Hugging Face `datasets` feature metadata.

Episodes are streamed from any sequence (`len` and indexing), for instance a lazy disk-backed one: a validation pass
loads them one at a time and notes their lengths and tasks, then the writing pass loads each once more and passes it
to the data file, the video encoders and the statistics before the next is loaded, so at most about one episode is
in memory whatever `episodes_per_file` is. Statistics are accumulated episode by episode: vectors as float64 min, max,
mean and sum of squared deviations merged with Chan et al.'s parallel formula, images as exact per-channel counts of
the 256 pixel values. `EpisodeSpool` is such a sequence: a producer appends episodes to it one by one (one
uncompressed `.npz` file each in a directory of its own), writes the dataset from it, and closes it, which removes
the directory.

Deliberate simplifications: one task per episode; statistics are plain min/max/mean/std/count over all frames
(LeRobot subsamples images and adds quantiles); v3.0 episode metadata goes in one file without per-episode `stats/`
columns; files are never split by size. The whole dataset is built in a temporary sibling directory and renamed into
place, so a reader never sees half of one, and an existing root is never overwritten.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from pi0_lightning.data.lerobot import (
    DEFAULT_CHUNKS_SIZE,
    INFO_PATH,
    STATS_PATH,
    V2_DATA_PATH,
    V2_EPISODES_PATH,
    V2_EPISODES_STATS_PATH,
    V2_TASKS_PATH,
    V2_VIDEO_PATH,
    V3_DATA_PATH,
    V3_EPISODES_PATH,
    V3_TASKS_PATH,
    V3_VIDEO_PATH,
    pyav,
)
from pi0_lightning.data.source import DatasetError, KeyMap

VIDEO_GOP = 2
"""Keyframe interval, LeRobot's default: random access decodes at most one extra frame."""
IMAGE_STRUCT = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
"""The Hugging Face `datasets` Image feature's storage type."""
_HF_DTYPES = {pa.float32(): "float32", pa.int64(): "int64"}
_ARRAY_FIELDS = ("images", "wrist_images", "state", "actions")
_STATS_PIXELS = 1 << 20
"""Pixels per block when counting an episode's pixel values (bounds the temporary index array to 24 MiB)."""


@dataclass
class DemoEpisode:
    """One demonstration: per step two camera frames (upright), a state and an action; the task is the prompt."""

    images: np.ndarray
    """(T, H, W, 3) uint8, the third-person camera."""
    wrist_images: np.ndarray
    """(T, H', W', 3) uint8, the wrist camera."""
    state: np.ndarray
    """(T, S) float32."""
    actions: np.ndarray
    """(T, A) float32."""
    task: str


def write_lerobot_dataset(
    root: str | Path,
    episodes: Sequence[DemoEpisode] | Sequence[dict[str, Any]],
    fps: int = 10,
    version: Literal["v3.0", "v2.1"] = "v3.0",
    image_storage: Literal["video", "image"] = "video",
    video_codec: str = "libsvtav1",
    robot_type: str = "panda",
    keys: KeyMap | None = None,
    *,
    video_crf: int = 20,
    video_gop: int = VIDEO_GOP,
    chunks_size: int = DEFAULT_CHUNKS_SIZE,
    episodes_per_file: int | None = None,
) -> Path:
    """Write `episodes` as a LeRobot dataset at `root` (which must not exist) and return `root`.

    `episodes`: `DemoEpisode`s or dicts of its fields, in any sequence (`len` and indexing, e.g. an `EpisodeSpool`):
    each is indexed twice, once to check it and once to write it, and released before the next is indexed (another
    iterable is read into a list first). `video_codec`: any PyAV encoder name ("libsvtav1" is AV1, LeRobot's default;
    "libx264"/"h264", "hevc", ...). `video_crf`: the encoder's constant-rate factor (LeRobot uses 30; lower keeps
    frames closer to the originals). `video_gop`: frames between keyframes (random access decodes up to this many
    frames). `keys`: the dataset keys of our fields. `chunks_size`: files per chunk directory (v2.1: episodes per
    chunk). `episodes_per_file`: v3.0 episodes per data/video file.
    """
    root = Path(root)
    keys = keys if keys is not None else KeyMap()
    if version not in ("v2.1", "v3.0"):
        raise DatasetError(f"{root}: cannot write codebase_version {version!r} (v2.1 or v3.0)")
    if image_storage not in ("video", "image"):
        raise DatasetError(f"{root}: image_storage must be 'video' or 'image', not {image_storage!r}")
    if root.exists():
        raise DatasetError(f"{root}: already exists; refusing to overwrite a dataset")
    names = [keys.image, keys.wrist_image, keys.state, keys.actions]
    if len(set(names)) < 4 or set(names) & {"timestamp", "frame_index", "episode_index", "index", "task_index"}:
        raise DatasetError(f"{root}: KeyMap keys {names} must be distinct and not LeRobot's bookkeeping columns")
    if not (hasattr(episodes, "__len__") and hasattr(episodes, "__getitem__")):
        episodes = list(episodes)
    demos = _Demos(episodes)
    shapes, lengths, tasks = _check_episodes(root, demos)
    if image_storage == "video":
        _check_video(root, video_codec, shapes)
    writer = _Writer(
        demos,
        keys,
        shapes,
        lengths,
        tasks,
        fps=fps,
        version=version,
        video=image_storage == "video",
        codec=video_codec,
        crf=video_crf,
        gop=video_gop,
        chunks_size=chunks_size,
        episodes_per_file=max(1, episodes_per_file or len(lengths)),
    )

    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = root.parent / f".{root.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        writer.write(tmp, robot_type)
        if root.exists():  # another writer finished first: keep theirs
            raise DatasetError(f"{root}: appeared while writing; refusing to overwrite a dataset")
        os.rename(tmp, root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return root


def _as_demo(episode: DemoEpisode | dict[str, Any]) -> DemoEpisode:
    """A copy with array fields as numpy arrays (the caller's objects stay as they are)."""
    fields = vars(episode) if isinstance(episode, DemoEpisode) else episode
    arrays = {name: np.asarray(fields[name]) for name in _ARRAY_FIELDS}
    return DemoEpisode(**arrays, task=fields["task"])


class _Demos:
    """The caller's episodes as `DemoEpisode`s, each converted by `_as_demo` when it is indexed; nothing is kept."""

    def __init__(self, episodes: Sequence[DemoEpisode] | Sequence[dict[str, Any]]):
        self.episodes = episodes

    def __len__(self) -> int:
        return len(self.episodes)

    def __getitem__(self, index: int) -> DemoEpisode:
        return _as_demo(self.episodes[index])


def _check_episodes(root: Path, demos: _Demos) -> tuple[dict[str, tuple[int, ...]], list[int], list[str]]:
    """Shapes shared by all episodes (image and wrist_image (H, W, 3), state (S,), actions (A,)), and each episode's
    length and task; the episodes are loaded one at a time."""
    if len(demos) == 0:
        raise DatasetError(f"{root}: no episodes to write")
    shapes: dict[str, tuple[int, ...]] = {}
    lengths: list[int] = []
    tasks: list[str] = []
    for number in range(len(demos)):
        demo = demos[number]
        length = len(demo.state)
        fields = {"image": demo.images, "wrist_image": demo.wrist_images, "state": demo.state, "actions": demo.actions}
        for name, array in fields.items():
            is_image = name in ("image", "wrist_image")
            if is_image and (array.dtype != np.uint8 or array.ndim != 4 or array.shape[-1] != 3):
                raise DatasetError(f"{root}: episode {number} {name} must be (T, H, W, 3) uint8, is {array.shape}")
            if not is_image and array.ndim != 2:
                raise DatasetError(f"{root}: episode {number} {name} must be (T, D), is {array.shape}")
            if len(array) != length or length == 0:
                raise DatasetError(f"{root}: episode {number} has {len(array)} steps of {name}, {length} of state")
            if shapes.setdefault(name, array.shape[1:]) != array.shape[1:]:
                raise DatasetError(f"{root}: episode {number} {name} shape {array.shape[1:]} != {shapes[name]}")
        if not isinstance(demo.task, str) or not demo.task:
            raise DatasetError(f"{root}: episode {number} has no task string")
        lengths.append(length)
        tasks.append(demo.task)
        del demo, fields, array  # released before the next episode loads
    return shapes, lengths, tasks


def _check_video(root: Path, codec: str, shapes: dict[str, tuple[int, ...]]) -> None:
    av = pyav()
    try:
        av.codec.Codec(codec, "w")
    except av.codec.codec.UnknownCodecError as e:
        raise DatasetError(f"{root}: video encoder {codec!r} is not available in this PyAV build") from e
    for name in ("image", "wrist_image"):
        height, width, _ = shapes[name]
        if height % 2 or width % 2:
            raise DatasetError(f"{root}: {name} size {height}x{width} must be even for yuv420p video")


class _Writer:
    def __init__(
        self,
        demos: _Demos,
        keys: KeyMap,
        shapes: dict[str, tuple[int, ...]],
        lengths: list[int],
        episode_tasks: list[str],
        *,
        fps: int,
        version: str,
        video: bool,
        codec: str,
        crf: int,
        gop: int,
        chunks_size: int,
        episodes_per_file: int,
    ):
        self.demos, self.keys, self.shapes = demos, keys, shapes
        self.lengths, self.episode_tasks = lengths, episode_tasks
        self.fps, self.version, self.video = fps, version, video
        self.codec, self.crf, self.gop = codec, crf, gop
        self.chunks_size, self.episodes_per_file = chunks_size, episodes_per_file
        self.tasks = list(dict.fromkeys(episode_tasks))
        self.task_index = {task: index for index, task in enumerate(self.tasks)}
        # dataset key -> (DemoEpisode field, shape name)
        self.cameras = {keys.image: ("images", "image"), keys.wrist_image: ("wrist_images", "wrist_image")}

    # -- layout ----------------------------------------------------------------------------------------------------

    def write(self, out: Path, robot_type: str) -> None:
        (out / "meta").mkdir()
        if self.version == "v2.1":
            self._write_v21(out)
        else:
            self._write_v30(out)
        (out / INFO_PATH).write_text(json.dumps(self._info(robot_type), indent=4) + "\n")

    def _write_v21(self, out: Path) -> None:
        starts = np.cumsum([0, *self.lengths])
        stats = []
        for index in range(len(self.lengths)):
            chunk = index // self.chunks_size
            data = out / V2_DATA_PATH.format(episode_chunk=chunk, episode_index=index)
            videos = {
                key: out / V2_VIDEO_PATH.format(episode_chunk=chunk, video_key=key, episode_index=index)
                for key in (self.cameras if self.video else ())
            }
            episode_stats = _Stats(self)
            self._write_group(data, videos, [index], int(starts[index]), episode_stats)
            stats.append({"episode_index": index, "stats": episode_stats.as_json()})
        episodes = [
            {"episode_index": index, "tasks": [task], "length": length}
            for index, (task, length) in enumerate(zip(self.episode_tasks, self.lengths, strict=True))
        ]
        _write_jsonl(out / V2_EPISODES_PATH, episodes)
        _write_jsonl(out / V2_TASKS_PATH, [{"task_index": i, "task": task} for i, task in enumerate(self.tasks)])
        _write_jsonl(out / V2_EPISODES_STATS_PATH, stats)

    def _write_v30(self, out: Path) -> None:
        count = len(self.lengths)
        groups = [
            range(start, min(start + self.episodes_per_file, count))
            for start in range(0, count, self.episodes_per_file)
        ]
        stats = _Stats(self)
        rows: list[dict[str, Any]] = []
        chunk, file, first_row = 0, 0, 0
        for group in groups:
            data = out / V3_DATA_PATH.format(chunk_index=chunk, file_index=file)
            videos = {
                key: out / V3_VIDEO_PATH.format(video_key=key, chunk_index=chunk, file_index=file)
                for key in (self.cameras if self.video else ())
            }
            self._write_group(data, videos, group, first_row, stats)
            seconds = 0.0
            for index in group:
                length = self.lengths[index]
                row: dict[str, Any] = {
                    "episode_index": index,
                    "tasks": [self.episode_tasks[index]],
                    "length": length,
                    "data/chunk_index": chunk,
                    "data/file_index": file,
                    "dataset_from_index": first_row,
                    "dataset_to_index": first_row + length,
                }
                for key in videos:
                    row[f"videos/{key}/chunk_index"] = chunk
                    row[f"videos/{key}/file_index"] = file
                    row[f"videos/{key}/from_timestamp"] = seconds
                    row[f"videos/{key}/to_timestamp"] = seconds + length / self.fps
                row["meta/episodes/chunk_index"] = 0
                row["meta/episodes/file_index"] = 0
                rows.append(row)
                first_row += length
                seconds += length / self.fps
            # the same rule as LeRobot's update_chunk_file_indices: chunks_size files per chunk directory
            chunk, file = (chunk + 1, 0) if file == self.chunks_size - 1 else (chunk, file + 1)
        episodes_path = out / V3_EPISODES_PATH.format(chunk_index=0, file_index=0)
        episodes_path.parent.mkdir(parents=True)
        pq.write_table(pa.Table.from_pylist(rows), episodes_path)
        _write_tasks_parquet(out / V3_TASKS_PATH, self.tasks)
        (out / STATS_PATH).write_text(json.dumps(stats.as_json(), indent=4) + "\n")

    def _write_group(
        self, data: Path, videos: dict[str, Path], group: Iterable[int], first_row: int, stats: _Stats
    ) -> None:
        """The episodes of `group` into one data file and one video file per camera in `videos`, and into `stats`:
        each episode is loaded once and released before the next."""
        with ExitStack() as files:
            parquet = files.enter_context(self._parquet(data))
            encoders = {
                key: files.enter_context(self._encoder(path, self.cameras[key][1])) for key, path in videos.items()
            }
            for index in group:
                demo = self.demos[index]
                self._write_rows(parquet, demo, index, first_row)
                for key, encode in encoders.items():
                    encode(getattr(demo, self.cameras[key][0]))
                stats.add(demo, index, first_row)
                first_row += len(demo.state)
                del demo

    def _info(self, robot_type: str) -> dict[str, Any]:
        total_frames = sum(self.lengths)
        n = len(self.lengths)
        info: dict[str, Any] = {"codebase_version": self.version, "robot_type": robot_type}
        info.update(total_episodes=n, total_frames=total_frames, total_tasks=len(self.tasks))
        if self.version == "v2.1":
            chunks = (n + self.chunks_size - 1) // self.chunks_size
            info.update(total_videos=2 * n if self.video else 0, total_chunks=chunks, chunks_size=self.chunks_size)
            info.update(fps=self.fps, splits={"train": f"0:{n}"}, data_path=V2_DATA_PATH)
            info["video_path"] = V2_VIDEO_PATH if self.video else None
        else:
            info.update(chunks_size=self.chunks_size, data_files_size_in_mb=100, video_files_size_in_mb=200)
            info.update(fps=self.fps, splits={"train": f"0:{n}"}, data_path=V3_DATA_PATH)
            info["video_path"] = V3_VIDEO_PATH if self.video else None
        info["features"] = self._features()
        return info

    def _features(self) -> dict[str, dict[str, Any]]:
        features: dict[str, dict[str, Any]] = {}
        for key, shape_name in ((self.keys.image, "image"), (self.keys.wrist_image, "wrist_image")):
            height, width, channels = self.shapes[shape_name]
            feature: dict[str, Any] = {
                "dtype": "video" if self.video else "image",
                "shape": [height, width, channels],
                "names": ["height", "width", "channels"],
            }
            if self.video:
                feature["info"] = {
                    "video.height": height,
                    "video.width": width,
                    "video.codec": pyav().codec.Codec(self.codec, "w").canonical_name,
                    "video.pix_fmt": "yuv420p",
                    "video.is_depth_map": False,
                    "video.fps": self.fps,
                    "video.channels": channels,
                    "video.g": self.gop,
                    "video.crf": self.crf,
                    "has_audio": False,
                }
            features[key] = feature
        # openpi's LIBERO conversion names a whole vector by its key
        features[self.keys.state] = {"dtype": "float32", "shape": list(self.shapes["state"]), "names": ["state"]}
        features[self.keys.actions] = {
            "dtype": "float32",
            "shape": list(self.shapes["actions"]),
            "names": ["actions"],
        }
        features["timestamp"] = {"dtype": "float32", "shape": [1], "names": None}
        for key in ("frame_index", "episode_index", "index", "task_index"):
            features[key] = {"dtype": "int64", "shape": [1], "names": None}
        if self.version == "v3.0":  # the v2.1 -> v3.0 converter gives every non-video feature the dataset fps
            for feature in features.values():
                if feature["dtype"] != "video":
                    feature["fps"] = self.fps
        return features

    # -- parquet ---------------------------------------------------------------------------------------------------

    @contextmanager
    def _parquet(self, path: Path) -> Iterator[pq.ParquetWriter]:
        """A data file taking one row group per episode (as LeRobot >= 0.6 writes them)."""
        path.parent.mkdir(parents=True, exist_ok=True)
        state_dim, action_dim = self.shapes["state"][0], self.shapes["actions"][0]
        fields = []
        if not self.video:
            fields += [(key, IMAGE_STRUCT) for key in self.cameras]
        fields += [
            (self.keys.state, pa.list_(pa.float32(), state_dim)),
            (self.keys.actions, pa.list_(pa.float32(), action_dim)),
            ("timestamp", pa.float32()),
            ("frame_index", pa.int64()),
            ("episode_index", pa.int64()),
            ("index", pa.int64()),
            ("task_index", pa.int64()),
        ]
        hf_features = {name: _hf_feature(kind) for name, kind in fields}
        schema = pa.schema(fields, metadata={"huggingface": json.dumps({"info": {"features": hf_features}})})
        with pq.ParquetWriter(path, schema) as writer:
            yield writer

    def _write_rows(self, writer: pq.ParquetWriter, demo: DemoEpisode, index: int, first_row: int) -> None:
        """The data rows of episode `index`, whose first row is `first_row` of the dataset, as one row group."""
        length = len(demo.state)
        columns: list[pa.Array] = []
        if not self.video:
            for field, _ in self.cameras.values():
                cells = [{"bytes": _png(image), "path": None} for image in getattr(demo, field)]
                columns.append(pa.array(cells, IMAGE_STRUCT))
        columns += [
            _fixed_lists(demo.state, self.shapes["state"][0]),
            _fixed_lists(demo.actions, self.shapes["actions"][0]),
            pa.array(np.arange(length, dtype=np.float32) / np.float32(self.fps), pa.float32()),
            pa.array(np.arange(length), pa.int64()),
            pa.array(np.full(length, index), pa.int64()),
            pa.array(np.arange(first_row, first_row + length), pa.int64()),
            pa.array(np.full(length, self.task_index[demo.task]), pa.int64()),
        ]
        writer.write_table(pa.Table.from_arrays(columns, schema=writer.schema))

    # -- video -----------------------------------------------------------------------------------------------------

    @contextmanager
    def _encoder(self, path: Path, shape_name: str) -> Iterator[Callable[[np.ndarray], None]]:
        """One video stream taking clips back to back, frame i of the stream at i / fps; the stream is flushed when
        the context ends without an error."""
        path.parent.mkdir(parents=True, exist_ok=True)
        height, width, _ = self.shapes[shape_name]
        options = {"g": str(self.gop), "crf": str(self.crf)}
        if self.codec == "libsvtav1":
            options["preset"] = "12"  # LeRobot's default: the fastest preset
        av = pyav()
        with av.open(str(path), "w") as container:
            stream = container.add_stream(self.codec, rate=self.fps, options=options)
            stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
            pts = 0

            def encode(clip: np.ndarray) -> None:
                nonlocal pts
                for image in clip:
                    frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(image), format="rgb24")
                    frame.pts, frame.time_base = pts, Fraction(1, self.fps)
                    container.mux(stream.encode(frame))
                    pts += 1

            yield encode
            container.mux(stream.encode(None))


class _Moments:
    """Per-column min, max, mean and sum of squared deviations (M2) of float64 rows, accumulated batch by batch with
    Chan et al.'s parallel formula: the same numbers as one pass over all rows, up to rounding."""

    def __init__(self) -> None:
        self.count = 0
        self.min = self.max = self.mean = self.m2 = np.zeros(0)

    def add(self, values: np.ndarray) -> None:
        values = np.asarray(values, dtype=np.float64)
        count, mean = len(values), values.mean(0)
        low, high, m2 = values.min(0), values.max(0), ((values - mean) ** 2).sum(0)
        if self.count == 0:
            self.count, self.min, self.max, self.mean, self.m2 = count, low, high, mean, m2
            return
        total = self.count + count
        delta = mean - self.mean
        self.mean = self.mean + delta * (count / total)
        self.m2 = self.m2 + m2 + delta**2 * (self.count * count / total)
        self.min, self.max, self.count = np.minimum(self.min, low), np.maximum(self.max, high), total

    def as_json(self) -> dict[str, list]:
        return {
            "min": self.min.tolist(),
            "max": self.max.tolist(),
            "mean": self.mean.tolist(),
            "std": np.sqrt(self.m2 / self.count).tolist(),
            "count": [self.count],
        }


class _PixelCounts:
    """Per channel, how many pixels have each of the 256 values, over whole frames: exact, so that episodes combine
    by addition, and statistics follow without converting the frames to float."""

    def __init__(self) -> None:
        self.counts = np.zeros((3, 256), np.int64)
        self.frames = 0

    def add(self, images: np.ndarray) -> None:
        frames = max(1, _STATS_PIXELS // max(1, images.shape[1] * images.shape[2]))
        offsets = np.arange(3, dtype=np.intp) * 256  # channel c counts in bins c * 256 ...
        for start in range(0, len(images), frames):
            pixels = images[start : start + frames].reshape(-1, 3)
            self.counts += np.bincount((pixels + offsets).ravel(), minlength=3 * 256).reshape(3, 256)
        self.frames += len(images)

    def as_json(self) -> dict[str, list]:
        """Per-channel statistics shaped (3, 1, 1), values in [0, 1], as LeRobot keeps them for cameras."""
        values = np.arange(256) / 255.0
        pixels = self.counts.sum(1)
        mean = self.counts @ values / pixels
        std = np.sqrt((self.counts * (values - mean[:, None]) ** 2).sum(1) / pixels)
        seen = self.counts > 0
        low, high = values[seen.argmax(1)], values[255 - seen[:, ::-1].argmax(1)]
        stats = {"min": low, "max": high, "mean": mean, "std": std}
        return {
            **{name: [[[value]] for value in array.tolist()] for name, array in stats.items()},
            "count": [self.frames],
        }


class _Stats:
    """Per-feature min/max/mean/std/count over the frames of the episodes added (images per channel in [0, 1])."""

    def __init__(self, writer: _Writer):
        self.writer = writer
        names = (writer.keys.state, writer.keys.actions, "timestamp", "frame_index", "episode_index", "index")
        self.vectors = {name: _Moments() for name in (*names, "task_index")}
        self.images = {key: _PixelCounts() for key in writer.cameras}

    def add(self, demo: DemoEpisode, index: int, first_row: int) -> None:
        writer, length = self.writer, len(demo.state)
        columns = {
            writer.keys.state: demo.state,
            writer.keys.actions: demo.actions,
            "timestamp": np.arange(length)[:, None] / writer.fps,
            "frame_index": np.arange(length)[:, None],
            "episode_index": np.full((length, 1), index),
            "index": np.arange(first_row, first_row + length)[:, None],
            "task_index": np.full((length, 1), writer.task_index[demo.task]),
        }
        for name, values in columns.items():
            self.vectors[name].add(values)
        for key, (field, _) in writer.cameras.items():
            self.images[key].add(getattr(demo, field))

    def as_json(self) -> dict[str, dict[str, list]]:
        return {name: moments.as_json() for name, moments in (*self.vectors.items(), *self.images.items())}


class EpisodeSpool(Sequence[DemoEpisode]):
    """A disk-backed, append-only sequence of `DemoEpisode`s: a producer appends episodes as they come and passes
    the spool to `write_lerobot_dataset`, which loads them one at a time, so the dataset never has to fit in memory.

    `directory`: where the episodes go, one uncompressed `episode_NNNNNN.npz` each (written under a temporary name
    and renamed, read back without pickle). The spool creates it (with its parents) unless it is an existing empty
    directory, refuses any other existing path, and removes it on `close()` or at the end of a `with` block. One
    process appends; the files are only read after `append` has returned.
    """

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        if self.directory.exists() and (not self.directory.is_dir() or any(self.directory.iterdir())):
            raise DatasetError(f"{self.directory}: exists and is not an empty directory; refusing to use it as a spool")
        self.directory.mkdir(parents=True, exist_ok=True)
        self._count = 0
        self._closed = False

    def _path(self, index: int) -> Path:
        return self.directory / f"episode_{index:06d}.npz"

    def _check_open(self) -> None:
        if self._closed:
            raise DatasetError(f"{self.directory}: episode spool is closed")

    def append(self, episode: DemoEpisode | dict[str, Any]) -> None:
        """Save `episode` (a `DemoEpisode` or a dict of its fields) as the next one."""
        self._check_open()
        demo = _as_demo(episode)
        arrays = {name: getattr(demo, name) for name in _ARRAY_FIELDS}
        for name, array in arrays.items():
            if array.dtype.hasobject:
                raise DatasetError(f"{self.directory}: episode {self._count} {name} has dtype object; arrays only")
        if not isinstance(demo.task, str):
            raise DatasetError(f"{self.directory}: episode {self._count} task must be a string, is {demo.task!r}")
        path = self._path(self._count)
        tmp = path.with_name(f".{path.name}.tmp")
        try:
            with open(tmp, "wb") as file:
                np.savez(file, task=np.array(demo.task), **arrays)
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        self._count += 1

    def __len__(self) -> int:
        return self._count

    def __getitem__(self, index: int) -> DemoEpisode:
        self._check_open()
        if not -self._count <= index < self._count:
            raise IndexError(f"episode {index} of a spool of {self._count}")
        with np.load(self._path(index % self._count), allow_pickle=False) as arrays:
            return DemoEpisode(**{name: arrays[name] for name in _ARRAY_FIELDS}, task=str(arrays["task"]))

    def close(self) -> None:
        """Remove the directory and its episodes; the spool cannot be used afterwards."""
        self._closed = True
        shutil.rmtree(self.directory, ignore_errors=True)

    def __enter__(self) -> EpisodeSpool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _hf_feature(kind: pa.DataType) -> dict[str, Any]:
    """The Hugging Face `datasets` feature of one of our column types, as its schema metadata spells it."""
    if kind == IMAGE_STRUCT:
        return {"_type": "Image"}
    if pa.types.is_fixed_size_list(kind):
        return {"feature": _hf_feature(kind.value_type), "length": kind.list_size, "_type": "Sequence"}
    return {"dtype": _HF_DTYPES[kind], "_type": "Value"}


def _fixed_lists(values: np.ndarray, dim: int) -> pa.Array:
    flat = pa.array(np.ascontiguousarray(values, dtype=np.float32).reshape(-1), pa.float32())
    return pa.FixedSizeListArray.from_arrays(flat, dim)


def _png(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def _write_jsonl(path: Path, items: list[dict[str, Any]]) -> None:
    path.write_text("".join(json.dumps(item) + "\n" for item in items))


def _write_tasks_parquet(path: Path, tasks: list[str]) -> None:
    try:
        import pandas as pd
    except ImportError:  # same columns without the pandas index marker; our reader and pyarrow read either
        table = pa.table({"task_index": pa.array(range(len(tasks)), pa.int64()), "task": pa.array(tasks, pa.string())})
    else:
        frame = pd.DataFrame({"task_index": np.arange(len(tasks), dtype=np.int64)}, index=pd.Index(tasks, name="task"))
        table = pa.Table.from_pandas(frame)
    pq.write_table(table, path)
