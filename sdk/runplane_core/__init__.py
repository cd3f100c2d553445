"""The core the SDK and the services share, with no I/O: the cron parser and the meaning of
metadata operations. (The generated protobuf modules, ``runplane.v1``, are shared the same way.)"""
