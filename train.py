import hydra

from resnet_sweep.train import check_group_choices, run


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg) -> float:
    return run(cfg)


if __name__ == "__main__":
    check_group_choices()
    main()
