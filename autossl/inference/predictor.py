"""The predictor: trained networks -> predictions in the raw image geometry (nnU-Net v2's
``nnUNetPredictor``, extended to SSL methods that predict with several networks).

A *model* is one or more folds; each fold holds one or more *member* networks (an SSL method's
``inference_networks``, e.g. the CNN and the transformer of cross teaching). Members are combined
per tile by averaging their probabilities (see ``sliding_window``); folds are combined by
averaging logits, as nnU-Net does.

Two ways to set a predictor up:

* ``initialize_from_trained_model_folder(model_folder, use_folds, checkpoint_name)``: reads
  ``plans.json``, ``dataset.json`` and ``fold_X/<checkpoint>``;
* ``manual_initialization(network_states, network_specs, plans, configuration, dataset_json,
  inference_allowed_mirroring_axes, networks=None)``: what the trainer uses. Either give
  ``network_states`` (one ``{name: state_dict}`` per fold) with ``network_specs``
  (``[{"name", "arch"}]``), or ``networks`` (live modules of one fold, DDP/compiled allowed; they
  are put in eval mode without deep supervision only while predicting, and their device is used).

Then ``predict_from_files`` (raw images -> files), ``predict_single_npy_array``,
``predict_preprocessed_cases`` (preprocessed cases -> files, or -> probabilities in the
preprocessed space for pseudo-labels) or ``predict_logits_from_preprocessed_data``.
"""
from __future__ import annotations

import concurrent.futures as cf
import inspect
import os
from collections import deque
from contextlib import contextmanager
from copy import deepcopy
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from autossl.imageio.channel_files import CHANNEL_RE, assign_channel_files, group_case_files
from autossl.inference.export import (convert_predicted_logits_to_segmentation_with_correct_shape,
                                      export_prediction_from_logits)
from autossl.inference.sliding_window import SlidingWindowPredictor
from autossl.networks.build import (ArchitectureError, architecture_entry, build_network, has_deep_supervision,
                                    set_deep_supervision)
from autossl.networks.norms import instance_norm_as_group_norm
from autossl.utilities.file_io import UnsafeCheckpointError, load_json, load_torch_safely, save_json
from autossl.utilities.label_handling import LabelManager


class PredictionError(RuntimeError):
    """Prediction cannot run; the message names the file or folder and what is wrong."""


# ---------------------------------------------------------------------------------------------
# input listing
# ---------------------------------------------------------------------------------------------
def list_cases_in_folder(folder: str | os.PathLike, file_ending: str, num_channels: int,
                         reader=None) -> dict[str, list[str]]:
    """Group ``CASE_XXXX<file_ending>`` files of ``folder`` by case; every channel must be there.
    ``reader`` (the dataset's reader/writer) says how many channels a file holds: one, or three
    for an RGB PNG of ``NaturalImage2DIO`` (``autossl.imageio.channel_files``)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise PredictionError(f"input folder {folder} does not exist")
    files = [f for f in sorted(folder.iterdir())
             if f.is_file() and not f.name.startswith(".") and f.name.endswith(file_ending)]
    cases, unnamed = group_case_files(files, file_ending)
    if unnamed:
        raise PredictionError(f"{unnamed[0]}: image file names must end in _XXXX{file_ending} (channel ID), "
                              f"e.g. case_0000{file_ending}")
    if not cases:
        others = sorted({"".join(p.suffixes) for p in folder.iterdir() if p.is_file()})
        raise PredictionError(f"input folder {folder} has no images ending in {file_ending!r} (the dataset's "
                              f"file_ending)" + (f"; found endings {others}" if others else "; it is empty"))
    if reader is None:
        from autossl.imageio.registry import reader_writer_class

        reader = reader_writer_class(file_ending)()
    out = {}
    for case, chans in sorted(cases.items()):
        ordered, problems = assign_channel_files(case, chans, num_channels, reader, folder, file_ending,
                                                 expected=f"the model needs {num_channels} channel(s)")
        if problems:
            raise PredictionError(problems[0])
        out[case] = ordered
    return out


def _case_from_files(files: Sequence[str], file_ending: str) -> str:
    name = Path(files[0]).name
    if not name.endswith(file_ending):
        raise PredictionError(f"{files[0]}: does not end in the dataset's file_ending {file_ending!r}")
    stem = name[: -len(file_ending)]
    m = CHANNEL_RE.search(stem)
    return stem[: m.start()] if m else stem


def num_input_channels(dataset_json: dict) -> int:
    return len(dataset_json.get("channel_names", dataset_json.get("modality", {})))


def _strip_prefixes(state: dict) -> dict:
    """State dicts saved from DDP (``module.``) or compiled (``_orig_mod.``) networks."""
    out = {}
    for k, v in state.items():
        for p in ("module.", "_orig_mod."):
            while k.startswith(p):
                k = k[len(p):]
        out[k] = v
    return out


def _unwrap(net: nn.Module) -> nn.Module:
    """The plain module inside DDP (calling DDP in eval would still sync buffers)."""
    return net.module if isinstance(net, nn.parallel.DistributedDataParallel) else net


def _get_plans_manager(plans):
    from autossl.planning.plans_handler import PlansManager

    if isinstance(plans, (dict, str, os.PathLike)):
        return PlansManager(plans if isinstance(plans, dict) else load_json(plans))
    return plans


def _member_specs(ckpt: dict, members: Sequence[str], path: Path) -> list[dict]:
    """Specs {"name", "arch"} of the requested networks of an autossl checkpoint."""
    specs = {s["name"]: s for s in (ckpt.get("network_specs") or ckpt.get("inference_networks") or [])}
    available = sorted(set(specs) & set(ckpt.get("networks") or {}))
    unknown = [m for m in members if m not in available]
    if unknown:
        raise PredictionError(f"{path}: --members {' '.join(unknown)}: not networks of this checkpoint; "
                              f"it has {', '.join(available) or 'no named networks'}")
    return [{"name": m, "arch": specs[m].get("arch", "cnn")} for m in dict.fromkeys(members)]


def _fold_key(f) -> int | str:
    return f if f == "all" else int(f)


# ---------------------------------------------------------------------------------------------
class Predictor:
    """See the module docstring. ``batch_size``: network inputs per forward pass (default by patch
    size); ``use_amp``: None = automatic autocast (float16 on CUDA, bfloat16 on CPUs with native
    bf16), False = float32 throughout (``sliding_window.autocast_dtype``)."""

    def __init__(self, tile_step_size: float = 0.5, use_gaussian: bool = True, use_mirroring: bool = True,
                 device: torch.device | str = torch.device("cpu"), verbose: bool = False, allow_tqdm: bool = True,
                 batch_size: int | None = None, use_amp: bool | None = None):
        self.tile_step_size = tile_step_size
        self.use_gaussian = use_gaussian
        self.use_mirroring = use_mirroring
        self.device = torch.device(device)
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True
        self.verbose = verbose
        self.allow_tqdm = allow_tqdm
        self.batch_size = batch_size
        self.use_amp = use_amp
        #: patches through a network so far, over every prediction of this predictor
        #: (``SlidingWindowPredictor.network_inputs``)
        self.network_inputs = 0
        self.plans_manager = self.configuration_manager = self.dataset_json = self.label_manager = None
        self.trainer_name: str | None = None
        self.allowed_mirroring_axes: tuple[int, ...] | None = None
        self.network_specs: list[dict] = []
        self.list_of_parameters: list[dict] | None = None  # per fold {name: state_dict}
        self.networks: dict[str, nn.Module] = {}
        self._live = False

    # ----------------------------------------------------------------- set-up
    @staticmethod
    def auto_detect_available_folds(model_folder: str | os.PathLike, checkpoint_name: str) -> list[int]:
        model_folder = Path(model_folder)
        folds = sorted(int(p.name[5:]) for p in model_folder.glob("fold_*")
                       if p.name[5:].isdigit() and (p / checkpoint_name).is_file())
        return folds

    def initialize_from_trained_model_folder(self, model_folder: str | os.PathLike,
                                             use_folds: Sequence[int | str] | int | str | None = None,
                                             checkpoint_name: str = "checkpoint_final.pth",
                                             members: Sequence[str] | None = None) -> None:
        """``members``: which of the checkpoint's networks predict (softmax averaged), instead of the
        method's ``inference_networks`` (e.g. ``["transformer"]`` or ``["cnn", "transformer"]`` for
        cross teaching, ``["student1", "student2"]`` for UCMT)."""
        model_folder = Path(model_folder)
        if not model_folder.is_dir():
            raise PredictionError(f"model folder {model_folder} does not exist; train a model first "
                                  f"(autossl_train DATASET CONFIGURATION FOLD ...)")
        for f in ("plans.json", "dataset.json"):
            if not (model_folder / f).is_file():
                raise PredictionError(f"{model_folder / f} is missing; is {model_folder} a training output folder?")
        if use_folds is None:
            use_folds = self.auto_detect_available_folds(model_folder, checkpoint_name)
            if not use_folds:
                raise PredictionError(f"{model_folder}: no fold_X/{checkpoint_name} found; train a fold first "
                                      f"(autossl_train DATASET CONFIGURATION FOLD ...) or pick another -chk")
            if self.verbose:
                print(f"using folds {use_folds}")
        elif isinstance(use_folds, (int, str)):
            use_folds = [use_folds]
        states, specs, configuration, mirror_axes, trainer_name = [], None, None, None, None
        for f in use_folds:
            path = model_folder / f"fold_{_fold_key(f)}" / checkpoint_name
            if not path.is_file():
                present = sorted(p.name for p in path.parent.glob("checkpoint_*.pth")) if path.parent.is_dir() else []
                raise PredictionError(f"checkpoint {path} not found"
                                      + (f" (this fold has {present}; use -chk)" if present else
                                         f"; train fold {f} first (autossl_train DATASET CONFIGURATION {f} ...)"))
            try:
                ckpt = load_torch_safely(path)
            except UnsafeCheckpointError as e:  # truncated, foreign, or carrying pickled objects (never executed)
                raise PredictionError(str(e)) from None
            fold_specs = ckpt.get("inference_networks") or [{"name": "network", "arch": "cnn"}]
            if members:
                fold_specs = _member_specs(ckpt, members, path)
            fold_specs = [{"name": s["name"], "arch": s.get("arch", "cnn")} for s in fold_specs]
            if "networks" in ckpt and ckpt["networks"]:
                missing = [s["name"] for s in fold_specs if s["name"] not in ckpt["networks"]]
                if missing:
                    raise PredictionError(f"{path}: inference networks {missing} are not in the checkpoint")
                fold_states = {s["name"]: ckpt["networks"][s["name"]] for s in fold_specs}
            else:  # nnU-Net-style checkpoint: one network
                fold_states = {fold_specs[0]["name"]: ckpt["network_weights"]}
            if specs is None:
                specs = fold_specs
                configuration = ckpt["init_args"]["configuration"]
                mirror_axes = ckpt.get("inference_allowed_mirroring_axes")
                trainer_name = ckpt.get("trainer_name")
            elif fold_specs != specs:
                raise PredictionError(f"{path}: inference networks {fold_specs} differ from fold "
                                      f"{use_folds[0]}'s {specs}")
            states.append(fold_states)
        dataset_json = load_json(model_folder / "dataset.json")
        plans = load_json(model_folder / "plans.json")
        self.manual_initialization(states, specs, plans, configuration, dataset_json, mirror_axes,
                                   trainer_name=trainer_name)

    def manual_initialization(self, network_states: Sequence[dict] | None, network_specs: Sequence[dict] | None,
                              plans, configuration: str, dataset_json: dict,
                              inference_allowed_mirroring_axes: Sequence[int] | None,
                              networks: Sequence[nn.Module] | dict[str, nn.Module] | None = None,
                              trainer_name: str | None = None) -> None:
        """See the module docstring. ``plans``: dict, path or PlansManager."""
        self.plans_manager = _get_plans_manager(plans)
        self.configuration_manager = self.plans_manager.get_configuration(configuration)
        self.configuration_name = configuration
        self.dataset_json = dataset_json
        self.label_manager = LabelManager.from_dataset_json(dataset_json)
        self.trainer_name = trainer_name
        self.allowed_mirroring_axes = (tuple(int(a) for a in inference_allowed_mirroring_axes)
                                       if inference_allowed_mirroring_axes is not None else None)
        if networks is not None:
            if isinstance(networks, dict):
                names, mods = list(networks), list(networks.values())
            else:
                mods = list(networks)
                names = [s["name"] for s in network_specs] if network_specs else [f"net{i}" for i in range(len(mods))]
            if not mods:
                raise ValueError("manual_initialization: networks is empty")
            self.networks = dict(zip(names, mods))
            self.network_specs = [{"name": n, "arch": "live"} for n in names]
            self.list_of_parameters = None
            self._live = True
            return
        if not network_states or not network_specs:
            raise ValueError("manual_initialization needs network_states and network_specs, or networks")
        self.network_specs = [{"name": s["name"], "arch": s.get("arch", "cnn")} for s in network_specs]
        self.list_of_parameters = [{k: _strip_prefixes(v) for k, v in fold.items()} for fold in network_states]
        self.networks = {s["name"]: self._build(s["arch"]) for s in self.network_specs}
        self._live = False
        self._load_fold(0)

    def _architecture(self, arch: str) -> dict:
        try:
            return architecture_entry(self.configuration_manager.configuration, arch,
                                      f"configuration {self.configuration_name!r} of the plans")
        except ArchitectureError as e:
            raise PredictionError(str(e)) from None

    def _build(self, arch: str) -> nn.Module:
        net = build_network(self._architecture(arch), num_input_channels(self.dataset_json),
                            self.label_manager.num_segmentation_heads, deep_supervision=False)
        if self.device.type == "cpu":  # the same normalisation with a faster CPU kernel (same weights)
            instance_norm_as_group_norm(net)
        return net.to(self.device).eval()

    def _load_fold(self, i: int) -> None:
        for name, state in self.list_of_parameters[i].items():
            try:
                self.networks[name].load_state_dict(state)
            except RuntimeError as e:
                raise PredictionError(f"the weights of network {name!r} (fold index {i}) do not fit the "
                                      f"architecture in the plans: {str(e).splitlines()[0]}") from None

    @property
    def num_folds(self) -> int:
        return 1 if self._live else len(self.list_of_parameters or ())

    def _check_ready(self) -> None:
        if self.plans_manager is None or not self.networks:
            raise PredictionError("the predictor is not initialised: call initialize_from_trained_model_folder "
                                  "or manual_initialization first")

    # ----------------------------------------------------------------- core
    @contextmanager
    def _networks_for_inference(self) -> Iterator[tuple[list[nn.Module], torch.device]]:
        mods = [_unwrap(m) for m in self.networks.values()]
        if not self._live:
            yield mods, self.device
            return
        saved = [(m.training, has_deep_supervision(m)) for m in mods]
        try:
            for m in mods:
                m.eval()
                set_deep_supervision(m, False)
            p = next(mods[0].parameters(), None)
            yield mods, (p.device if p is not None else self.device)
        finally:
            for m, (training, ds) in zip(mods, saved):
                m.train(training)
                set_deep_supervision(m, ds)

    def _sliding_window(self, mods: list[nn.Module], device: torch.device) -> SlidingWindowPredictor:
        mirror = self.allowed_mirroring_axes if self.use_mirroring else None
        return SlidingWindowPredictor(
            mods, self.configuration_manager.patch_size, self.label_manager.num_segmentation_heads,
            tile_step_size=self.tile_step_size, use_gaussian=self.use_gaussian, mirror_axes=mirror,
            regions=self.label_manager.has_regions, device=device, batch_size=self.batch_size,
            use_amp=self.use_amp, allow_tqdm=False, verbose=self.verbose)

    @torch.inference_mode()
    def predict_logits_from_preprocessed_data(self, data: torch.Tensor | np.ndarray) -> torch.Tensor:
        """Preprocessed case (c, *spatial) -> logits (heads, *spatial), float32 on the CPU, averaged
        over folds (logits) and members (probabilities, handed on in log space)."""
        self._check_ready()
        if isinstance(data, np.ndarray):
            data = torch.from_numpy(np.ascontiguousarray(data))
        prediction = None
        with self._networks_for_inference() as (mods, device):
            sw = self._sliding_window(mods, device)
            for i in range(self.num_folds):
                if not self._live and self.num_folds > 1:
                    self._load_fold(i)
                p = sw.predict(data)
                prediction = p if prediction is None else prediction.add_(p)
            self.network_inputs += sw.network_inputs
        if self.num_folds > 1:
            prediction /= self.num_folds
        return prediction

    def predict_probabilities_from_preprocessed_data(self, data: torch.Tensor | np.ndarray) -> torch.Tensor:
        """As ``predict_logits_from_preprocessed_data``, then softmax (sigmoid for regions)."""
        return self.label_manager.logits_to_probabilities(self.predict_logits_from_preprocessed_data(data))

    # ----------------------------------------------------------------- preprocessed input
    def predict_preprocessed_cases(self, folder: str | os.PathLike, cases: Sequence[str] | None = None,
                                   output_folder: str | os.PathLike | None = None, save_probabilities: bool = False,
                                   num_processes_segmentation_export: int = 1, return_probabilities: bool = True):
        """Predict cases stored by the preprocessing (``autossl.preprocessing.storage``).

        Without ``output_folder``: returns {case: probabilities (heads, *preprocessed spatial)
        float32 numpy} (logits when ``return_probabilities`` is False), e.g. for pseudo-labels.
        With ``output_folder``: writes ``<case><file_ending>`` in the raw geometry (+ npz/pkl with
        ``save_probabilities``), like the trainer's final validation; returns the written paths.
        """
        from autossl.preprocessing import storage

        self._check_ready()
        folder = Path(folder)
        cases = list(cases) if cases is not None else storage.list_cases(folder)
        missing = [c for c in cases if not (folder / f"{c}.pkl").is_file()]
        if missing:
            raise PredictionError(f"{folder}: preprocessed cases {missing[:5]} not found")
        results: dict = {}
        with _Exporter(num_processes_segmentation_export) as exporter:
            for case in tqdm(cases, desc="predicting", disable=not self.allow_tqdm):
                data, _, props = storage.load_case(folder, case, mmap=False, load_seg=False)
                logits = self.predict_logits_from_preprocessed_data(data)
                if output_folder is None:
                    out = self.label_manager.logits_to_probabilities(logits) if return_probabilities else logits
                    results[case] = out.float().numpy()
                else:
                    exporter.submit(export_prediction_from_logits, logits.numpy(), props,
                                    self.configuration_manager, self.plans_manager, self.dataset_json,
                                    str(Path(output_folder) / case), save_probabilities)
            written = exporter.results()
        return results if output_folder is None else written

    # ----------------------------------------------------------------- raw input
    def _preprocess(self, files: Sequence[str]):
        from autossl.preprocessing.preprocessor import DefaultPreprocessor

        data, _, props = DefaultPreprocessor(verbose=False).run_case(
            list(files), None, self.plans_manager, self.configuration_manager, self.dataset_json)
        return data, props

    def _manage_input_and_output_lists(self, list_of_lists_or_source_folder, output_folder, overwrite: bool,
                                       save_probabilities: bool):
        fe = self.dataset_json["file_ending"]
        if isinstance(list_of_lists_or_source_folder, (str, os.PathLike)):
            from autossl.preprocessing.preprocessor import reader_for

            groups = list_cases_in_folder(list_of_lists_or_source_folder, fe, num_input_channels(self.dataset_json),
                                          reader_for(self.dataset_json, self.plans_manager))
            lists = list(groups.values())
            case_ids = list(groups)
        else:
            lists = [list(map(str, li)) for li in list_of_lists_or_source_folder]
            if not lists:
                raise PredictionError("no cases given to predict")
            for li in lists:
                for f in li:
                    if not Path(f).is_file():
                        raise PredictionError(f"input image {f} does not exist")
            case_ids = [_case_from_files(li, fe) for li in lists]
        outputs = [str(Path(output_folder) / c) for c in case_ids]
        if not overwrite:
            keep = [i for i, o in enumerate(outputs)
                    if not (Path(o + fe).is_file() and (not save_probabilities or Path(o + ".npz").is_file()))]
            if self.verbose or len(keep) < len(outputs):
                print(f"continuing: {len(outputs) - len(keep)} of {len(outputs)} case(s) already predicted")
            lists = [lists[i] for i in keep]
            outputs = [outputs[i] for i in keep]
        return lists, outputs

    def predict_from_files(self, list_of_lists_or_source_folder: str | os.PathLike | Sequence[Sequence[str]],
                           output_folder: str | os.PathLike, save_probabilities: bool = False,
                           overwrite: bool = True, num_processes_preprocessing: int = 1,
                           num_processes_segmentation_export: int = 1) -> list[str]:
        """Predict raw images (a folder of ``CASE_XXXX<ending>`` files or lists of channel files per
        case) into ``output_folder``; returns the written segmentation paths.

        Preprocessing of the next cases and the export of finished ones run in background threads
        (``num_processes_*`` of each) while the networks predict: no process start-up cost, and
        the heavy numpy/torch work releases the GIL."""
        self._check_ready()
        output_folder = Path(output_folder)
        output_folder.mkdir(parents=True, exist_ok=True)
        args = {k: v for k, v in locals().items() if k in inspect.signature(self.predict_from_files).parameters}
        args = {k: (str(v) if isinstance(v, os.PathLike) else v) for k, v in args.items()}
        save_json(deepcopy(args), output_folder / "predict_from_raw_data_args.json")
        save_json(self.dataset_json, output_folder / "dataset.json", sort_keys=False)
        save_json(self.plans_manager.plans, output_folder / "plans.json", sort_keys=False)

        lists, outputs = self._manage_input_and_output_lists(list_of_lists_or_source_folder, output_folder,
                                                             overwrite, save_probabilities)
        if not lists:
            return []
        npp = max(1, int(num_processes_preprocessing))
        with cf.ThreadPoolExecutor(npp, thread_name_prefix="autossl-preprocess") as pre_pool, \
                _Exporter(num_processes_segmentation_export) as exporter:
            pending: deque = deque()
            it = iter(zip(lists, outputs))

            def refill():
                while len(pending) < npp + 1:
                    try:
                        li, out = next(it)
                    except StopIteration:
                        return
                    pending.append((li, out, pre_pool.submit(self._preprocess, li)))

            refill()
            with tqdm(total=len(lists), desc="predicting", disable=not self.allow_tqdm) as bar:
                while pending:
                    li, out, fut = pending.popleft()
                    try:
                        data, props = fut.result()
                    except Exception as e:
                        raise PredictionError(f"preprocessing {li[0]} failed: {type(e).__name__}: {e}") from e
                    refill()
                    logits = self.predict_logits_from_preprocessed_data(torch.from_numpy(data))
                    del data
                    exporter.submit(export_prediction_from_logits, logits.numpy(), props,
                                    self.configuration_manager, self.plans_manager, self.dataset_json, out,
                                    save_probabilities)
                    bar.update()
            written = exporter.results()
        return written

    def predict_single_npy_array(self, input_image: np.ndarray, image_properties: dict,
                                 output_file_truncated: str | os.PathLike | None = None,
                                 save_or_return_probabilities: bool = False):
        """One image as a reader returns it ((c, x, y, z), props with at least ``spacing``; keep the
        reader's geometry keys to write files). With ``output_file_truncated`` the result is written
        (returns the path); otherwise returns the segmentation (and probabilities) in the input's
        array layout."""
        from autossl.preprocessing.preprocessor import DefaultPreprocessor

        self._check_ready()
        props = deepcopy(image_properties)
        data, _ = DefaultPreprocessor(verbose=self.verbose).run_case_npy(
            np.asarray(input_image), None, props, self.plans_manager, self.configuration_manager, self.dataset_json)
        logits = self.predict_logits_from_preprocessed_data(torch.from_numpy(data))
        if output_file_truncated is not None:
            return export_prediction_from_logits(logits, props, self.configuration_manager, self.plans_manager,
                                                 self.dataset_json, output_file_truncated,
                                                 save_or_return_probabilities)
        return convert_predicted_logits_to_segmentation_with_correct_shape(
            logits, self.plans_manager, self.configuration_manager, self.label_manager, props,
            save_or_return_probabilities)


class _Exporter:
    """Runs exports in background threads, at most ``n + 1`` waiting (bounded memory)."""

    def __init__(self, n: int):
        self.n = max(1, int(n))
        self.pool = cf.ThreadPoolExecutor(self.n, thread_name_prefix="autossl-export")
        self.futures: list[cf.Future] = []

    def submit(self, fn, *args) -> None:
        while sum(not f.done() for f in self.futures) > self.n:
            cf.wait([f for f in self.futures if not f.done()], return_when=cf.FIRST_COMPLETED)
        self.futures.append(self.pool.submit(fn, *args))

    def results(self) -> list:
        return [f.result() for f in self.futures]

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.pool.shutdown(wait=True, cancel_futures=exc[0] is not None)
        return False
