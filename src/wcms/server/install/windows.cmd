@echo off
rem WCMS client for Windows, served by the WCMS server at @@SERVER@@.
rem Run as administrator:  windows.cmd 123456      (the registration PIN)
rem                        windows.cmd -Uninstall
powershell -NoProfile -ExecutionPolicy Bypass -Command "& ([scriptblock]::Create((Invoke-RestMethod '@@SERVER@@/install/windows.ps1'))) %*"
exit /b %ERRORLEVEL%
