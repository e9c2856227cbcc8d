from .adapter import ADAPTER_WEIGHT_NAME, IPAdapterModules, read_adapter_file

__all__ = ["ADAPTER_WEIGHT_NAME", "IPAdapterModules", "read_adapter_file"]
