"""Write an untrained fold-0 ``checkpoint_final.pth`` for nnU-Net v2, to time its prediction without training it.

Run with the nnU-Net venv's python after ``../shared/bench/nnunet/run.sh DATASET 0 OUT`` (plan and preprocess
only), with that run's ``nnUNet_raw``/``nnUNet_preprocessed``/``nnUNet_results`` exported:

    nnUNet_raw=OUT/raw nnUNet_preprocessed=OUT/pre nnUNet_results=OUT/res \\
        /work/.venv-nnunet/bin/python benchmarks/nnunet_untrained_fold.py [3d_fullres|2d]

nnU-Net's time per predicted case does not depend on its weights (same network, tiles, mirrorings, resampling
and export), while one epoch of its CPU training takes half an hour on a 2-core machine. The checkpoint holds
its planned network, freshly initialised, under the benchmark trainer's name (``nnUNetTrainer_Budget``), where
``benchmarks/bench_predict.py --nnunet-out OUT`` looks. Its labels are meaningless: only its time counts.

The checkpoint must also carry the mirror axes a trained one has: nnU-Net sets them only when training starts
(``configure_rotation_dummyDA_mirroring_and_inital_patch_size``) and its predictor mirrors along the axes the
checkpoint names, so a checkpoint saved right after ``initialize()`` names none and predicts without TTA.
"""

import os
import shutil
import sys

import torch
from batchgenerators.utilities.file_and_folder_operations import save_json
from nnunetv2.run import run_training
from nnunetv2.training.nnUNetTrainer.variants.nnUNetTrainer_Budget import nnUNetTrainer_Budget

if __name__ == "__main__":
    config = sys.argv[1] if len(sys.argv) > 1 else "3d_fullres"
    # as the bench shim does: a CPU-only torch cannot import every trainer module to find this one by name
    run_training.recursive_find_trainer_class_by_name = lambda name, *a, **k: nnUNetTrainer_Budget
    trainer = run_training.get_trainer_from_args("99", config, 0, "nnUNetTrainer_Budget",
                                                 device=torch.device("cpu"))
    trainer.initialize()
    trainer.configure_rotation_dummyDA_mirroring_and_inital_patch_size()  # the mirror axes TTA uses
    os.makedirs(trainer.output_folder, exist_ok=True)
    # what nnU-Net's training writes beside its folds at its start, and its predictor reads
    base = trainer.output_folder_base
    save_json(trainer.plans_manager.plans, os.path.join(base, "plans.json"), sort_keys=False)
    save_json(trainer.dataset_json, os.path.join(base, "dataset.json"), sort_keys=False)
    shutil.copyfile(os.path.join(trainer.preprocessed_dataset_folder_base, "dataset_fingerprint.json"),
                    os.path.join(base, "dataset_fingerprint.json"))
    path = os.path.join(trainer.output_folder, "checkpoint_final.pth")
    trainer.save_checkpoint(path)
    print(path)
