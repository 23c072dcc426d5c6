from tsld_ds.teacher.cache import CacheIdentity, TeacherCache
from tsld_ds.teacher.engine import TeacherEngine

__all__ = ["CacheIdentity", "TeacherCache", "TeacherEngine"]
