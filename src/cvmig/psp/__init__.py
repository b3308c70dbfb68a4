"""The emulated AMD secure processor (PSP): SEV's migration commands with real cryptography.

`api` is the contract (`SecureProcessor`, `Status`, `PspError`, ...); `mailbox` runs the
PSP as its own process (`PspProcess`) and gives the hypervisor its client
(`MailboxClient`) and the guest's vCPUs their memory key (`fetch_memory_key`);
`firmware.Firmware` is the same firmware in process, for unit tests. See README.md here.
"""
