"""The emulated AMD secure processor (PSP): SEV's migration commands with real cryptography.

`api` is the contract (`SecureProcessor`, `Status`, `PspError`, ...); `process` runs the
PSP as its own process (`PspProcess`), `server` is its mailbox, `client` gives the
hypervisor its client (`MailboxClient`) and the guest's vCPUs their memory key
(`fetch_memory_key`), `commands` is the table both share (`mailbox` re-exports the old names);
`firmware.Firmware` is the same firmware in process, for unit tests. See README.md here.
"""
