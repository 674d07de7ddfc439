"""LeRobot-format demonstration datasets read from a local directory (no hub, no `lerobot` package).

Format facts this reader relies on (checked against huggingface/lerobot, v0.3.3 for v2.1, v0.4-v0.6 for v3.0):

- `meta/info.json`: `codebase_version`, `fps`, `chunks_size` (default 1000), `data_path` and `video_path` (path
  templates; `video_path` is null without videos), `features` {key: {dtype, shape, names, ...}}. Image features have
  dtype "image" (encoded PNG stored in the parquet as the Hugging Face `Image` struct {bytes, path}) or "video" (one
  MP4 stream per key); a vector feature of shape (n,) is a list column, and of shape (1,) a scalar column.
- v2.0 / v2.1: one parquet per episode at `data_path` = `data/chunk-{episode_chunk:03d}/episode_{episode_index:06d}
  .parquet`, one video per key and episode at `video_path` = `videos/chunk-{episode_chunk:03d}/{video_key}/episode_
  {episode_index:06d}.mp4`, `episode_chunk = episode_index // chunks_size`. `meta/episodes.jsonl` lines
  {episode_index, tasks: [str], length}, `meta/tasks.jsonl` lines {task_index, task}. Frame t of an episode's video
  is at t / fps. (v2.1 added `meta/episodes_stats.jsonl`; nothing here reads statistics.)
- v3.0: several episodes per file. `data_path` = `data/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet`,
  `video_path` = `videos/{video_key}/chunk-{chunk_index:03d}/file-{file_index:03d}.mp4` (episodes concatenated).
  `meta/episodes/chunk-XXX/file-XXX.parquet` rows: episode_index, tasks, length, data/chunk_index,
  data/file_index, dataset_from_index, dataset_to_index (global row numbers), and per video key
  videos/<key>/{chunk_index, file_index, from_timestamp, to_timestamp}. `meta/tasks.parquet` is a pandas frame
  with a `task_index` column and the task strings as its index, stored as column "__index_level_0__" (files written
  by LeRobot 0.4's converter and recorder) or "task" (a named index). A video file is the episodes' own files
  remuxed back to back, so from_timestamp is the sum of the earlier episodes' durations and frame t of an episode is
  at from_timestamp + t / fps.
  LeRobot >= 0.6 writes one parquet row group per episode; this reader reads only the row groups it needs.
- Every data parquet has `timestamp`, `frame_index`, `episode_index`, `index`, `task_index` columns beside the
  features. LeRobot encodes video with libsvtav1 (AV1), yuv420p, GOP 2 by default; PyAV decodes whatever FFmpeg
  decodes (AV1 through libdav1d, h264, hevc, ...).

Deliberate simplifications:

- The prompt is the first entry of the episode's `tasks` list (the frame-level `task_index` of the episode's first
  row when that list is missing); datasets that change task inside an episode get one prompt per episode.
- Video frame t is looked up at t / fps (plus from_timestamp) instead of the parquet `timestamp` column: LeRobot's
  recorder writes exactly frame_index / fps there, and this keeps image access free of parquet reads. A frame matches
  when its presentation time is within half a frame of the target.
- An episode's rows inside a data file are found from the file's `episode_index` column rather than from
  dataset_from_index, so files need not be read in any particular order.
- Images are returned as stored (LeRobot datasets converted by openpi are upright); `rotate_180=True` is for
  datasets recorded from raw LIBERO renders, which are upside down.
"""

from __future__ import annotations

import io
import json
import os
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from pi0_lightning.data.source import DatasetError, EpisodeInfo, KeyMap

SUPPORTED_VERSIONS = ("v2.0", "v2.1", "v3.0")
DEFAULT_CHUNKS_SIZE = 1000
INFO_PATH = "meta/info.json"
V2_EPISODES_PATH = "meta/episodes.jsonl"
V2_TASKS_PATH = "meta/tasks.jsonl"
V2_EPISODES_STATS_PATH = "meta/episodes_stats.jsonl"
V2_DATA_PATH = "data/chunk-{episode_chunk:03d}/episode_{episode_index:06d}.parquet"
V2_VIDEO_PATH = "videos/chunk-{episode_chunk:03d}/{video_key}/episode_{episode_index:06d}.mp4"
V3_EPISODES_DIR = "meta/episodes"
V3_EPISODES_PATH = V3_EPISODES_DIR + "/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet"
V3_TASKS_PATH = "meta/tasks.parquet"
V3_DATA_PATH = "data/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet"
V3_VIDEO_PATH = "videos/{video_key}/chunk-{chunk_index:03d}/file-{file_index:03d}.mp4"
STATS_PATH = "meta/stats.json"

_MAX_OPEN_VIDEOS = 32
"""Open video containers kept per process: v2.1 has one file per episode and key, so an unbounded cache would hold
thousands of file descriptors."""
_FORWARD_DECODE_S = 1.0
"""Decode forward from the current position (instead of seeking) when the target is at most this far ahead."""


@dataclass
class _Location:
    """Where one episode's rows and frames are: its data file and, per video key, (file, time of its frame 0)."""

    data: Path
    videos: dict[str, tuple[Path, float]]


_EpisodeRow = tuple[int, int, str | None, _Location]
"""(episode_index, length, first task or None when the metadata lists none, location) from the episode metadata."""


def pyav():
    """PyAV, imported when a dataset's videos are first read or written: datasets stored as images need no video
    decoder, so a machine without PyAV can still train on them."""
    try:
        import av
    except ImportError as e:
        raise DatasetError("reading or writing LeRobot videos needs PyAV (pip install av)") from e
    return av


class _VideoFile:
    """One open video container with a decoder that remembers its position, so that consecutive frames of an
    episode decode forward instead of seeking to a keyframe each time."""

    def __init__(self, path: Path):
        self.path = path
        av = self._av = pyav()
        try:
            self._container = av.open(str(path))
            self._stream = self._container.streams.video[0]
        except (av.FFmpegError, IndexError) as e:
            raise DatasetError(f"{path}: cannot open as a video ({_one_line(e)})") from e
        self._frames: Iterator[Any] | None = None
        self._last: tuple[float, np.ndarray] | None = None

    def close(self) -> None:
        self._frames = None
        self._container.close()

    def frame_at(self, t: float, half: float) -> np.ndarray:
        """The RGB frame whose presentation time is within `half` seconds of `t`, a copy the caller may modify."""
        last = self._last
        if last is not None and abs(last[0] - t) <= half:
            return last[1].copy()
        if self._frames is None or last is None or t < last[0] or t - last[0] > _FORWARD_DECODE_S:
            self._seek(t - half)
        assert self._frames is not None
        try:
            for frame in self._frames:
                if frame.pts is None:
                    continue
                time = float(frame.pts * frame.time_base)
                if time < t - half:
                    continue
                if time > t + half:
                    break
                image = frame.to_ndarray(format="rgb24")
                self._last = (time, image)
                return image.copy()
        except self._av.FFmpegError as e:
            self._frames, self._last = None, None
            raise DatasetError(f"{self.path}: cannot decode the frame at {t:.4f} s ({_one_line(e)})") from e
        self._frames, self._last = None, None
        raise DatasetError(
            f"{self.path}: no frame within half a frame of {t:.4f} s (video too short or timestamps off)"
        )

    def _seek(self, t: float) -> None:
        # Seeking to half a frame before the target lands on a keyframe at or before it even when the stored
        # timestamps round slightly differently from ours.
        offset = max(0, int(t / self._stream.time_base))
        try:
            self._container.seek(offset, backward=True, any_frame=False, stream=self._stream)
        except self._av.FFmpegError as e:
            raise DatasetError(f"{self.path}: cannot seek to {t:.4f} s ({_one_line(e)})") from e
        self._frames = self._container.decode(self._stream)
        self._last = None


class LeRobotSource:
    """A LeRobot v2.0 / v2.1 / v3.0 dataset directory as a `DemoSource` (see the module docstring for the format).

    Metadata is read on construction; rows, images and videos are read on demand. Files are opened lazily in the
    process that reads them: the source pickles as its arguments, so each DataLoader worker opens its own.
    `rotate_180`: rotate every returned image by 180 degrees, for datasets recorded from raw LIBERO renders (which
    are upside down); datasets converted by openpi are upright and need the default False.
    """

    def __init__(self, root: str | Path, keys: KeyMap | None = None, rotate_180: bool = False):
        self.root = Path(root)
        self.keys = keys if keys is not None else KeyMap()
        self.rotate_180 = rotate_180
        info = _read_info(self.root)
        self.info = info
        self.version: str = info["codebase_version"]
        self.fps = float(info["fps"])
        self.camera_dtypes, self.state_dim, self.action_dim = _check_features(self.root / INFO_PATH, info, self.keys)
        video_keys = [key for key, dtype in self.camera_dtypes.items() if dtype == "video"]
        if video_keys and not info.get("video_path"):
            raise DatasetError(f"{self.root / INFO_PATH}: features {video_keys} are videos but video_path is not set")
        if self.version.startswith("v2"):
            rows = self._read_v2_episodes(info, video_keys)
        else:
            rows = self._read_v3_episodes(info, video_keys)
        self._locations = [location for *_, location in rows]
        self.episodes: list[EpisodeInfo] = [EpisodeInfo(index, length, task or "") for index, length, task, _ in rows]
        self._rows: dict[Path, dict[int, tuple[int, int]]] = {}
        self._group_starts: dict[Path, np.ndarray] = {}
        self._columns: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self._image_group: dict[str, tuple[tuple[Path, int], list[Any]]] = {}
        self._videos: OrderedDict[Path, _VideoFile] = OrderedDict()
        self._pid = os.getpid()
        for position, (*_, task, _) in enumerate(rows):
            if task is None:  # no tasks list in the metadata: the task of the episode's first row
                self.episodes[position].task = self._first_row_task(position)

    def __reduce__(self) -> tuple[type, tuple[Path, KeyMap, bool]]:
        return (LeRobotSource, (self.root, self.keys, self.rotate_180))

    def __len__(self) -> int:
        return len(self.episodes)

    # -- DemoSource ------------------------------------------------------------------------------------------------

    def columns(self, episode: int) -> tuple[np.ndarray, np.ndarray]:
        cached = self._columns.get(episode)
        if cached is None:
            path, start, count = self._episode_rows(episode)
            table = self._read_rows(path, [self.keys.state, self.keys.actions], start, count)
            state = _to_matrix(table.column(self.keys.state), self.state_dim, path, self.keys.state)
            actions = _to_matrix(table.column(self.keys.actions), self.action_dim, path, self.keys.actions)
            cached = self._columns[episode] = (state, actions)
        return cached

    def frame_images(self, episode: int, frame: int) -> tuple[np.ndarray, np.ndarray]:
        length = self.episodes[episode].length
        if not 0 <= frame < length:
            raise IndexError(f"frame {frame} outside episode {self.episodes[episode].index} of length {length}")
        return self._image(episode, self.keys.image, frame), self._image(episode, self.keys.wrist_image, frame)

    # -- metadata --------------------------------------------------------------------------------------------------

    def _read_v2_episodes(self, info: dict, video_keys: list[str]) -> list[_EpisodeRow]:
        chunks_size = int(info.get("chunks_size") or DEFAULT_CHUNKS_SIZE)
        data_template = info.get("data_path") or V2_DATA_PATH
        video_template = info.get("video_path") or V2_VIDEO_PATH
        rows = []
        for item in sorted(_read_jsonl(self.root / V2_EPISODES_PATH), key=lambda item: item["episode_index"]):
            index, chunk = int(item["episode_index"]), int(item["episode_index"]) // chunks_size
            data = self.root / data_template.format(episode_chunk=chunk, episode_index=index)
            videos = {
                key: (self.root / video_template.format(episode_chunk=chunk, video_key=key, episode_index=index), 0.0)
                for key in video_keys
            }
            tasks = item.get("tasks") or [None]
            rows.append((index, int(item["length"]), tasks[0], _Location(data, videos)))
        return rows

    def _read_v3_episodes(self, info: dict, video_keys: list[str]) -> list[_EpisodeRow]:
        files = sorted((self.root / V3_EPISODES_DIR).glob("chunk-*/file-*.parquet"))
        if not files:
            raise DatasetError(f"{self.root / V3_EPISODES_DIR}: no episode metadata files (chunk-*/file-*.parquet)")
        required = ["episode_index", "length", "data/chunk_index", "data/file_index"]
        for key in video_keys:
            required += [f"videos/{key}/chunk_index", f"videos/{key}/file_index", f"videos/{key}/from_timestamp"]
        columns: dict[str, list] = {name: [] for name in [*required, "tasks"]}
        for path in files:
            names = _parquet_schema(path).names
            missing = [name for name in required if name not in names]
            if missing:
                raise DatasetError(f"{path}: episode metadata lacks columns {missing}")
            table = _read_parquet(path, [name for name in columns if name in names]).to_pydict()
            for name, values in columns.items():
                values.extend(table.get(name, [None] * len(table["episode_index"])))
        data_template = info.get("data_path") or V3_DATA_PATH
        video_template = info.get("video_path") or V3_VIDEO_PATH
        rows = []
        for i in np.argsort(columns["episode_index"], kind="stable"):
            data = self.root / data_template.format(
                chunk_index=columns["data/chunk_index"][i], file_index=columns["data/file_index"][i]
            )
            videos = {}
            for key in video_keys:
                chunk, file = columns[f"videos/{key}/chunk_index"][i], columns[f"videos/{key}/file_index"][i]
                path = self.root / video_template.format(video_key=key, chunk_index=chunk, file_index=file)
                videos[key] = (path, float(columns[f"videos/{key}/from_timestamp"][i]))
            tasks = columns["tasks"][i] or [None]
            rows.append(
                (int(columns["episode_index"][i]), int(columns["length"][i]), tasks[0], _Location(data, videos))
            )
        return rows

    def _first_row_task(self, episode: int) -> str:
        path, start, _ = self._episode_rows(episode)
        task_index = int(self._read_rows(path, ["task_index"], start, 1).column("task_index")[0].as_py())
        tasks = self._task_table()
        if task_index not in tasks:
            raise DatasetError(f"{path}: task_index {task_index} is not in the dataset's tasks")
        return tasks[task_index]

    def _task_table(self) -> dict[int, str]:
        if self.version.startswith("v2"):
            return {int(item["task_index"]): item["task"] for item in _read_jsonl(self.root / V2_TASKS_PATH)}
        path = self.root / V3_TASKS_PATH
        table = _read_parquet(path)
        # pandas writes the task strings as the frame's index: a column named "task", or "__index_level_0__" when
        # the index lost its name
        name = next((n for n in ("task", "__index_level_0__") if n in table.column_names), None)
        if name is None or "task_index" not in table.column_names:
            raise DatasetError(f"{path}: expected columns task and task_index, found {table.column_names}")
        return dict(zip(table.column("task_index").to_pylist(), table.column(name).to_pylist(), strict=True))

    # -- rows ------------------------------------------------------------------------------------------------------

    def _episode_rows(self, episode: int) -> tuple[Path, int, int]:
        """(data file, first row, row count) of `episodes[episode]`; the count is checked against its length."""
        info, path = self.episodes[episode], self._locations[episode].data
        by_episode = self._rows.get(path)
        if by_episode is None:
            by_episode = self._rows[path] = _episode_row_ranges(path)
        start, count = by_episode.get(info.index, (0, 0))
        if count != info.length:
            raise DatasetError(
                f"{path}: episode {info.index} has {count} rows but its metadata says length {info.length}"
            )
        return path, start, count

    def _read_rows(self, path: Path, columns: list[str], start: int, count: int) -> pa.Table:
        """Rows [start, start + count) of `columns`, reading only the row groups that hold them."""
        if count == 0:
            return _read_parquet(path, columns).slice(0, 0)
        starts = self._row_group_starts(path)
        first = int(np.searchsorted(starts, start, side="right")) - 1
        last = int(np.searchsorted(starts, start + count - 1, side="right")) - 1
        with pq.ParquetFile(path) as file:
            missing = [name for name in columns if name not in file.schema_arrow.names]
            if missing:
                raise DatasetError(f"{path}: no column {missing[0]!r} (columns: {', '.join(file.schema_arrow.names)})")
            table = file.read_row_groups(list(range(first, last + 1)), columns=columns)
        return table.slice(start - int(starts[first]), count)

    def _row_group_starts(self, path: Path) -> np.ndarray:
        starts = self._group_starts.get(path)
        if starts is None:
            metadata = pq.read_metadata(path)
            sizes = [metadata.row_group(i).num_rows for i in range(metadata.num_row_groups)]
            starts = self._group_starts[path] = np.concatenate([[0], np.cumsum(sizes)])
        return starts

    # -- images ----------------------------------------------------------------------------------------------------

    def _image(self, episode: int, key: str, frame: int) -> np.ndarray:
        if self.camera_dtypes[key] == "video":
            path, from_timestamp = self._locations[episode].videos[key]
            image = self._video(path).frame_at(from_timestamp + frame / self.fps, 0.5 / self.fps)
        else:
            image = self._parquet_image(episode, key, frame)
        if self.rotate_180:
            image = image[::-1, ::-1]
        return np.ascontiguousarray(image)

    def _parquet_image(self, episode: int, key: str, frame: int) -> np.ndarray:
        path, start, _ = self._episode_rows(episode)
        row = start + frame
        starts = self._row_group_starts(path)
        group = int(np.searchsorted(starts, row, side="right")) - 1
        # keep the last row group read per camera: consecutive frames of an episode usually share one
        cached = self._image_group.get(key)
        if cached is None or cached[0] != (path, group):
            with pq.ParquetFile(path) as file:
                cells = file.read_row_group(group, columns=[key]).column(key).combine_chunks()
            if pa.types.is_struct(cells.type):  # the Image struct; flatten() honours the struct's offset and nulls
                children = dict(zip([f.name for f in cells.type], cells.flatten(), strict=True))
                if "bytes" not in children:
                    raise DatasetError(f"{path}: column {key!r} is a struct without the image's bytes field")
                values, paths = children["bytes"].to_pylist(), children.get("path", pa.nulls(len(cells))).to_pylist()
            else:
                values, paths = cells.to_pylist(), [None] * len(cells)
            cached = ((path, group), list(zip(values, paths, strict=True)))
            self._image_group[key] = cached
        data, image_path = cached[1][row - int(starts[group])]
        if data is None and image_path:  # an image kept as a file next to the dataset instead of embedded
            image_file = self.root / image_path
            if not image_file.is_file():
                raise DatasetError(f"{path}: {key} of row {row} refers to missing image file {image_file}")
            data = image_file.read_bytes()
        if data is None:
            raise DatasetError(f"{path}: {key} of row {row} holds no image bytes")
        try:
            with Image.open(io.BytesIO(data)) as image:
                return np.array(image.convert("RGB"))  # writable, unlike asarray of a PIL image
        except OSError as e:
            raise DatasetError(f"{path}: {key} of row {row} is not a decodable image ({_one_line(e)})") from e

    def _video(self, path: Path) -> _VideoFile:
        if self._pid != os.getpid():
            # a forked worker shares the parent's file offsets: start from fresh containers, leave the parent's alone
            self._videos, self._pid = OrderedDict(), os.getpid()
        video = self._videos.get(path)
        if video is None:
            if not path.is_file():
                raise DatasetError(f"{path}: video file missing")
            video = self._videos[path] = _VideoFile(path)
            if len(self._videos) > _MAX_OPEN_VIDEOS:
                self._videos.popitem(last=False)[1].close()
        else:
            self._videos.move_to_end(path)
        return video


# -- helpers -----------------------------------------------------------------------------------------------------


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split())


def _read_info(root: Path) -> dict:
    if not root.is_dir():
        raise DatasetError(f"{root}: dataset root does not exist")
    path = root / INFO_PATH
    if not path.is_file():
        raise DatasetError(f"{path}: missing (not a LeRobot dataset root)")
    try:
        info = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise DatasetError(f"{path}: unreadable ({_one_line(e)})") from e
    version = info.get("codebase_version")
    if version not in SUPPORTED_VERSIONS:
        raise DatasetError(f"{path}: codebase_version {version!r} is not supported ({', '.join(SUPPORTED_VERSIONS)})")
    if not isinstance(info.get("features"), dict) or not info.get("fps"):
        raise DatasetError(f"{path}: features or fps missing")
    return info


def _check_features(path: Path, info: dict, keys: KeyMap) -> tuple[dict[str, str], int, int]:
    """Image dtype per camera key, state and action dimensions; each KeyMap key must be a feature of the right kind."""
    features = info["features"]
    wanted = {"image": keys.image, "wrist_image": keys.wrist_image, "state": keys.state, "actions": keys.actions}
    for field, key in wanted.items():
        if key not in features:
            raise DatasetError(
                f"{path}: KeyMap.{field} = {key!r} is not a feature (available: {', '.join(sorted(features))})"
            )
    cameras = {}
    for key in (keys.image, keys.wrist_image):
        dtype = features[key].get("dtype")
        if dtype not in ("image", "video"):
            raise DatasetError(f"{path}: feature {key!r} has dtype {dtype!r}, expected image or video")
        cameras[key] = dtype
    dims = []
    for key in (keys.state, keys.actions):
        shape = list(features[key].get("shape") or [])
        if len(shape) != 1 or features[key].get("dtype") in ("image", "video", "string"):
            raise DatasetError(f"{path}: feature {key!r} must be a 1-d vector, has shape {shape}")
        dims.append(int(shape[0]))
    return cameras, dims[0], dims[1]


def _read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        raise DatasetError(f"{path}: missing")
    try:
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    except ValueError as e:
        raise DatasetError(f"{path}: not JSON lines ({_one_line(e)})") from e


def _parquet_schema(path: Path) -> pa.Schema:
    if not path.is_file():
        raise DatasetError(f"{path}: parquet file missing")
    try:
        return pq.read_schema(path)
    except (OSError, pa.ArrowException) as e:
        raise DatasetError(f"{path}: unreadable parquet ({_one_line(e)})") from e


def _read_parquet(path: Path, columns: list[str] | None = None) -> pa.Table:
    _parquet_schema(path)
    try:
        return pq.read_table(path, columns=columns)
    except (OSError, pa.ArrowException) as e:
        raise DatasetError(f"{path}: unreadable parquet ({_one_line(e)})") from e


def _episode_row_ranges(path: Path) -> dict[int, tuple[int, int]]:
    """episode_index -> (first row, row count) in one data file; each episode's rows must be contiguous."""
    schema = _parquet_schema(path)
    if "episode_index" not in schema.names:
        raise DatasetError(f"{path}: no episode_index column")
    indices = _read_parquet(path, ["episode_index"]).column("episode_index").to_numpy()
    if len(indices) == 0:
        return {}
    starts = np.concatenate([[0], np.flatnonzero(np.diff(indices)) + 1])
    ranges: dict[int, tuple[int, int]] = {}
    for start, stop in zip(starts, [*starts[1:], len(indices)], strict=True):
        index = int(indices[start])
        if index in ranges:
            raise DatasetError(f"{path}: rows of episode {index} are not contiguous")
        ranges[index] = (int(start), int(stop - start))
    return ranges


def _to_matrix(column: pa.ChunkedArray, dim: int, path: Path, key: str) -> np.ndarray:
    """A list, fixed-size-list or (dim 1) scalar column as a (rows, dim) float32 array."""
    array = column.combine_chunks()
    if array.null_count:
        raise DatasetError(f"{path}: column {key!r} has missing values")
    is_list = pa.types.is_list(array.type) or pa.types.is_large_list(array.type)
    values = array.flatten() if is_list or pa.types.is_fixed_size_list(array.type) else array
    flat = values.to_numpy(zero_copy_only=False)
    if flat.size != len(array) * dim:
        raise DatasetError(f"{path}: column {key!r} does not hold {dim} values per row as its feature shape says")
    return flat.astype(np.float32).reshape(len(array), dim)
