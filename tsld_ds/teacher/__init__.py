from tsld_ds.teacher.cache import CacheIdentity, TeacherCache
from tsld_ds.teacher.engine import TeacherEngine, teacher_ds_config

__all__ = ["CacheIdentity", "TeacherCache", "TeacherEngine", "teacher_ds_config"]
