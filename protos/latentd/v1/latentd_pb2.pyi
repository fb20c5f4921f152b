from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DTYPE_UNSPECIFIED: _ClassVar[DType]
    UINT8: _ClassVar[DType]
    FLOAT16: _ClassVar[DType]
    BFLOAT16: _ClassVar[DType]
    FLOAT32: _ClassVar[DType]
    INT32: _ClassVar[DType]

class Priority(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    INTERACTIVE: _ClassVar[Priority]
    BULK: _ClassVar[Priority]

class Tiling(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    TILING_AUTO: _ClassVar[Tiling]
    TILING_ON: _ClassVar[Tiling]
    TILING_OFF: _ClassVar[Tiling]

class ImageFormat(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    IMAGE_FORMAT_UNSPECIFIED: _ClassVar[ImageFormat]
    PNG: _ClassVar[ImageFormat]
    JPEG: _ClassVar[ImageFormat]
    WEBP: _ClassVar[ImageFormat]
    RAW_UINT8: _ClassVar[ImageFormat]
    RAW_FLOAT: _ClassVar[ImageFormat]
DTYPE_UNSPECIFIED: DType
UINT8: DType
FLOAT16: DType
BFLOAT16: DType
FLOAT32: DType
INT32: DType
INTERACTIVE: Priority
BULK: Priority
TILING_AUTO: Tiling
TILING_ON: Tiling
TILING_OFF: Tiling
IMAGE_FORMAT_UNSPECIFIED: ImageFormat
PNG: ImageFormat
JPEG: ImageFormat
WEBP: ImageFormat
RAW_UINT8: ImageFormat
RAW_FLOAT: ImageFormat

class Tensor(_message.Message):
    __slots__ = ("dtype", "shape", "data")
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    dtype: DType
    shape: _containers.RepeatedScalarFieldContainer[int]
    data: bytes
    def __init__(self, dtype: _Optional[_Union[DType, str]] = ..., shape: _Optional[_Iterable[int]] = ..., data: _Optional[bytes] = ...) -> None: ...

class Image(_message.Message):
    __slots__ = ("encoded", "pixels")
    ENCODED_FIELD_NUMBER: _ClassVar[int]
    PIXELS_FIELD_NUMBER: _ClassVar[int]
    encoded: bytes
    pixels: Tensor
    def __init__(self, encoded: _Optional[bytes] = ..., pixels: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class EncodeOptions(_message.Message):
    __slots__ = ("raw", "sample", "seed", "latent_dtype", "tiling", "posterior", "packed", "indices", "refine_steps")
    RAW_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    LATENT_DTYPE_FIELD_NUMBER: _ClassVar[int]
    TILING_FIELD_NUMBER: _ClassVar[int]
    POSTERIOR_FIELD_NUMBER: _ClassVar[int]
    PACKED_FIELD_NUMBER: _ClassVar[int]
    INDICES_FIELD_NUMBER: _ClassVar[int]
    REFINE_STEPS_FIELD_NUMBER: _ClassVar[int]
    raw: bool
    sample: bool
    seed: int
    latent_dtype: DType
    tiling: Tiling
    posterior: bool
    packed: bool
    indices: bool
    refine_steps: int
    def __init__(self, raw: _Optional[bool] = ..., sample: _Optional[bool] = ..., seed: _Optional[int] = ..., latent_dtype: _Optional[_Union[DType, str]] = ..., tiling: _Optional[_Union[Tiling, str]] = ..., posterior: _Optional[bool] = ..., packed: _Optional[bool] = ..., indices: _Optional[bool] = ..., refine_steps: _Optional[int] = ...) -> None: ...

class EncodeRequest(_message.Message):
    __slots__ = ("model", "images", "options", "id", "priority")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    ID_FIELD_NUMBER: _ClassVar[int]
    PRIORITY_FIELD_NUMBER: _ClassVar[int]
    model: str
    images: _containers.RepeatedCompositeFieldContainer[Image]
    options: EncodeOptions
    id: str
    priority: Priority
    def __init__(self, model: _Optional[str] = ..., images: _Optional[_Iterable[_Union[Image, _Mapping]]] = ..., options: _Optional[_Union[EncodeOptions, _Mapping]] = ..., id: _Optional[str] = ..., priority: _Optional[_Union[Priority, str]] = ...) -> None: ...

class EncodedImage(_message.Message):
    __slots__ = ("latents", "height", "width", "logvar")
    LATENTS_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    LOGVAR_FIELD_NUMBER: _ClassVar[int]
    latents: Tensor
    height: int
    width: int
    logvar: Tensor
    def __init__(self, latents: _Optional[_Union[Tensor, _Mapping]] = ..., height: _Optional[int] = ..., width: _Optional[int] = ..., logvar: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class Error(_message.Message):
    __slots__ = ("code", "message")
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    code: str
    message: str
    def __init__(self, code: _Optional[str] = ..., message: _Optional[str] = ...) -> None: ...

class EncodeResponse(_message.Message):
    __slots__ = ("id", "model", "items", "error")
    ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    id: str
    model: str
    items: _containers.RepeatedCompositeFieldContainer[EncodedImage]
    error: Error
    def __init__(self, id: _Optional[str] = ..., model: _Optional[str] = ..., items: _Optional[_Iterable[_Union[EncodedImage, _Mapping]]] = ..., error: _Optional[_Union[Error, _Mapping]] = ...) -> None: ...

class DecodeOptions(_message.Message):
    __slots__ = ("raw", "format", "quality", "tiling", "packed")
    RAW_FIELD_NUMBER: _ClassVar[int]
    FORMAT_FIELD_NUMBER: _ClassVar[int]
    QUALITY_FIELD_NUMBER: _ClassVar[int]
    TILING_FIELD_NUMBER: _ClassVar[int]
    PACKED_FIELD_NUMBER: _ClassVar[int]
    raw: bool
    format: ImageFormat
    quality: int
    tiling: Tiling
    packed: bool
    def __init__(self, raw: _Optional[bool] = ..., format: _Optional[_Union[ImageFormat, str]] = ..., quality: _Optional[int] = ..., tiling: _Optional[_Union[Tiling, str]] = ..., packed: _Optional[bool] = ...) -> None: ...

class Latents(_message.Message):
    __slots__ = ("latents", "height", "width")
    LATENTS_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    latents: Tensor
    height: int
    width: int
    def __init__(self, latents: _Optional[_Union[Tensor, _Mapping]] = ..., height: _Optional[int] = ..., width: _Optional[int] = ...) -> None: ...

class DecodeRequest(_message.Message):
    __slots__ = ("model", "items", "options", "id", "priority")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    ID_FIELD_NUMBER: _ClassVar[int]
    PRIORITY_FIELD_NUMBER: _ClassVar[int]
    model: str
    items: _containers.RepeatedCompositeFieldContainer[Latents]
    options: DecodeOptions
    id: str
    priority: Priority
    def __init__(self, model: _Optional[str] = ..., items: _Optional[_Iterable[_Union[Latents, _Mapping]]] = ..., options: _Optional[_Union[DecodeOptions, _Mapping]] = ..., id: _Optional[str] = ..., priority: _Optional[_Union[Priority, str]] = ...) -> None: ...

class DecodeResponse(_message.Message):
    __slots__ = ("id", "model", "images", "error")
    ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    id: str
    model: str
    images: _containers.RepeatedCompositeFieldContainer[Image]
    error: Error
    def __init__(self, id: _Optional[str] = ..., model: _Optional[str] = ..., images: _Optional[_Iterable[_Union[Image, _Mapping]]] = ..., error: _Optional[_Union[Error, _Mapping]] = ...) -> None: ...

class ListModelsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListModelsResponse(_message.Message):
    __slots__ = ("models", "default_model")
    MODELS_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_MODEL_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedCompositeFieldContainer[ModelInfo]
    default_model: str
    def __init__(self, models: _Optional[_Iterable[_Union[ModelInfo, _Mapping]]] = ..., default_model: _Optional[str] = ...) -> None: ...

class GetModelRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class ModelInfo(_message.Message):
    __slots__ = ("name", "model_class", "latent_channels", "downsampling_factor", "scaling_factor", "shift_factor", "dtype", "device", "parameters", "has_posterior", "max_pixels", "max_batch_size", "latents_mean", "latents_std", "patch_size", "codebook_size", "codebook_dim")
    NAME_FIELD_NUMBER: _ClassVar[int]
    MODEL_CLASS_FIELD_NUMBER: _ClassVar[int]
    LATENT_CHANNELS_FIELD_NUMBER: _ClassVar[int]
    DOWNSAMPLING_FACTOR_FIELD_NUMBER: _ClassVar[int]
    SCALING_FACTOR_FIELD_NUMBER: _ClassVar[int]
    SHIFT_FACTOR_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    PARAMETERS_FIELD_NUMBER: _ClassVar[int]
    HAS_POSTERIOR_FIELD_NUMBER: _ClassVar[int]
    MAX_PIXELS_FIELD_NUMBER: _ClassVar[int]
    MAX_BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    LATENTS_MEAN_FIELD_NUMBER: _ClassVar[int]
    LATENTS_STD_FIELD_NUMBER: _ClassVar[int]
    PATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    CODEBOOK_SIZE_FIELD_NUMBER: _ClassVar[int]
    CODEBOOK_DIM_FIELD_NUMBER: _ClassVar[int]
    name: str
    model_class: str
    latent_channels: int
    downsampling_factor: int
    scaling_factor: float
    shift_factor: float
    dtype: str
    device: str
    parameters: int
    has_posterior: bool
    max_pixels: int
    max_batch_size: int
    latents_mean: _containers.RepeatedScalarFieldContainer[float]
    latents_std: _containers.RepeatedScalarFieldContainer[float]
    patch_size: int
    codebook_size: int
    codebook_dim: int
    def __init__(self, name: _Optional[str] = ..., model_class: _Optional[str] = ..., latent_channels: _Optional[int] = ..., downsampling_factor: _Optional[int] = ..., scaling_factor: _Optional[float] = ..., shift_factor: _Optional[float] = ..., dtype: _Optional[str] = ..., device: _Optional[str] = ..., parameters: _Optional[int] = ..., has_posterior: _Optional[bool] = ..., max_pixels: _Optional[int] = ..., max_batch_size: _Optional[int] = ..., latents_mean: _Optional[_Iterable[float]] = ..., latents_std: _Optional[_Iterable[float]] = ..., patch_size: _Optional[int] = ..., codebook_size: _Optional[int] = ..., codebook_dim: _Optional[int] = ...) -> None: ...

class InterpolateRequest(_message.Message):
    __slots__ = ("model", "image_a", "image_b", "steps", "method", "format", "quality")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    IMAGE_A_FIELD_NUMBER: _ClassVar[int]
    IMAGE_B_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    FORMAT_FIELD_NUMBER: _ClassVar[int]
    QUALITY_FIELD_NUMBER: _ClassVar[int]
    model: str
    image_a: Image
    image_b: Image
    steps: int
    method: str
    format: ImageFormat
    quality: int
    def __init__(self, model: _Optional[str] = ..., image_a: _Optional[_Union[Image, _Mapping]] = ..., image_b: _Optional[_Union[Image, _Mapping]] = ..., steps: _Optional[int] = ..., method: _Optional[str] = ..., format: _Optional[_Union[ImageFormat, str]] = ..., quality: _Optional[int] = ...) -> None: ...

class SamplePriorRequest(_message.Message):
    __slots__ = ("model", "count", "height", "width", "seed", "format", "quality")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    FORMAT_FIELD_NUMBER: _ClassVar[int]
    QUALITY_FIELD_NUMBER: _ClassVar[int]
    model: str
    count: int
    height: int
    width: int
    seed: int
    format: ImageFormat
    quality: int
    def __init__(self, model: _Optional[str] = ..., count: _Optional[int] = ..., height: _Optional[int] = ..., width: _Optional[int] = ..., seed: _Optional[int] = ..., format: _Optional[_Union[ImageFormat, str]] = ..., quality: _Optional[int] = ...) -> None: ...

class ImagesResponse(_message.Message):
    __slots__ = ("model", "images")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    model: str
    images: _containers.RepeatedCompositeFieldContainer[Image]
    def __init__(self, model: _Optional[str] = ..., images: _Optional[_Iterable[_Union[Image, _Mapping]]] = ...) -> None: ...

class AnomalyScoreRequest(_message.Message):
    __slots__ = ("model", "images")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    model: str
    images: _containers.RepeatedCompositeFieldContainer[Image]
    def __init__(self, model: _Optional[str] = ..., images: _Optional[_Iterable[_Union[Image, _Mapping]]] = ...) -> None: ...

class Score(_message.Message):
    __slots__ = ("mse", "psnr")
    MSE_FIELD_NUMBER: _ClassVar[int]
    PSNR_FIELD_NUMBER: _ClassVar[int]
    mse: float
    psnr: float
    def __init__(self, mse: _Optional[float] = ..., psnr: _Optional[float] = ...) -> None: ...

class AnomalyScoreResponse(_message.Message):
    __slots__ = ("model", "scores")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    SCORES_FIELD_NUMBER: _ClassVar[int]
    model: str
    scores: _containers.RepeatedCompositeFieldContainer[Score]
    def __init__(self, model: _Optional[str] = ..., scores: _Optional[_Iterable[_Union[Score, _Mapping]]] = ...) -> None: ...
