@echo off
rem WCMS client for Windows, from cmd.exe or a Group Policy startup script (runs as SYSTEM).
rem Made by the WCMS server at @@SERVER@@ for bundle @@BUNDLE@@.
rem Copy it from the server to the GPO's share (only administrators may write there), then:
rem     windows.cmd 123456        first install, with the registration PIN
rem     windows.cmd -Uninstall
rem It never runs a script it fetches. With the client installed it does nothing: the installed
rem client updates itself and takes only bundles signed by the key it pinned. On a first install
rem it downloads the bundle zip alone and runs it only if its SHA-256 is the one below.
setlocal EnableExtensions DisableDelayedExpansion
set "WCMS_SERVER=@@SERVER@@"
set "WCMS_BUNDLE=@@BUNDLE@@"
set "WCMS_SHA256=@@SHA256@@"
set "WCMS_PUBLIC_KEY=@@PUBLIC_KEY@@"
set "WCMS_TARGET=%ProgramFiles%\WCMS"
set "WCMS_WORK=%ProgramFiles%\WCMS.download"

if /i "%~1"=="-Uninstall" goto uninstall
if exist "%WCMS_TARGET%\python.exe" goto installed
if "%WCMS_SHA256%"=="" goto nohash

rem First install. The work folder is under Program Files, which only administrators can write,
rem so nothing can be slipped in beside the bundle's python.exe between the check and the run.
if exist "%WCMS_WORK%" rmdir /s /q "%WCMS_WORK%"
mkdir "%WCMS_WORK%"
if not exist "%WCMS_WORK%\" goto failed
if exist "%WCMS_WORK%\bundle" goto failed
echo WCMS: downloading %WCMS_BUNDLE%
rem Download, check the SHA-256, unpack: fixed code, reading its inputs from the variables above.
powershell -NoProfile -NonInteractive -ExecutionPolicy Bypass -Command "$ErrorActionPreference='Stop'; $ProgressPreference='SilentlyContinue'; [Net.ServicePointManager]::SecurityProtocol=[Net.ServicePointManager]::SecurityProtocol -bor 3072; $z=Join-Path $env:WCMS_WORK $env:WCMS_BUNDLE; Invoke-WebRequest -UseBasicParsing -Uri ($env:WCMS_SERVER+'/install/'+$env:WCMS_BUNDLE) -OutFile $z; $h=(Get-FileHash -Algorithm SHA256 -Path $z).Hash.ToLower(); if ($h -ne $env:WCMS_SHA256) { Write-Host ('WCMS: refused: the download''s SHA-256 is '+$h+', not '+$env:WCMS_SHA256); exit 1 }; Expand-Archive -Path $z -DestinationPath (Join-Path $env:WCMS_WORK 'bundle'); exit 0"
if errorlevel 1 goto refused
rem Only a folder the check above unpacked can hold python.exe: no verified zip, nothing to run.
if not exist "%WCMS_WORK%\bundle\python.exe" goto refused
set "WCMS_ARGS=--source "%WCMS_WORK%\bundle" --target "%WCMS_TARGET%" --server "%WCMS_SERVER%""
if not "%~1"=="" set "WCMS_ARGS=%WCMS_ARGS% --pin "%~1""
if not "%WCMS_PUBLIC_KEY%"=="" set "WCMS_ARGS=%WCMS_ARGS% --public-key "%WCMS_PUBLIC_KEY%""
"%WCMS_WORK%\bundle\python.exe" -m wcms.client.installer %WCMS_ARGS%
set "WCMS_CODE=%ERRORLEVEL%"
rmdir /s /q "%WCMS_WORK%"
exit /b %WCMS_CODE%

:installed
echo WCMS: the client is installed in %WCMS_TARGET%; it updates itself from signed bundles only.
exit /b 0

:nohash
echo WCMS: refused: this script holds no SHA-256 for the bundle; rebuild it on the server.
exit /b 1

:refused
echo WCMS: refused: no bundle matching SHA-256 %WCMS_SHA256% was downloaded; nothing was run.
if exist "%WCMS_WORK%" rmdir /s /q "%WCMS_WORK%"
exit /b 1

:failed
echo WCMS: cannot create %WCMS_WORK% (run as administrator or as SYSTEM).
exit /b 1

:uninstall
if exist "%WCMS_TARGET%\python.exe" "%WCMS_TARGET%\python.exe" -m wcms.client.installer --uninstall --target "%WCMS_TARGET%"
for %%d in ("%WCMS_TARGET%" "%WCMS_TARGET%.old" "%WCMS_TARGET%.staged" "%WCMS_WORK%") do if exist "%%~d" rmdir /s /q "%%~d"
echo WCMS: client removed.
exit /b 0
