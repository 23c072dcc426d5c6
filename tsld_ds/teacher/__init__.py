from tsld_ds.teacher.engine import TeacherEngine, TeacherOutput, teacher_ds_config

__all__ = ["TeacherEngine", "TeacherOutput", "teacher_ds_config"]
