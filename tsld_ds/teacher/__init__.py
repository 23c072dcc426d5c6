from tsld_ds.teacher.engine import TeacherEngine, teacher_ds_config

__all__ = ["TeacherEngine", "teacher_ds_config"]
