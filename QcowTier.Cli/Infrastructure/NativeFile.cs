using System.Runtime.InteropServices;
using Microsoft.Win32.SafeHandles;

namespace QcowTier.Cli.Infrastructure;

/// <summary>The Linux file calls .NET lacks: SEEK_DATA/SEEK_HOLE, hole punching, st_blocks, O_DIRECT opens.</summary>
internal static partial class NativeFile
{
    private const int SeekData = 3;
    private const int SeekHole = 4;
    private const int Enxio = 6;
    private const int FallocKeepSize = 0x01;
    private const int FallocPunchHole = 0x02;
    private const int FallocZeroRange = 0x10;

    private const int ORdOnly = 0x0;
    private const int ORdWr = 0x2;
    private const int OCloExec = 0x80000;

    private static int ODirect => RuntimeInformation.ProcessArchitecture is Architecture.Arm64 or Architecture.Arm ? 0x10000 : 0x4000;

    [LibraryImport("libc", EntryPoint = "open", SetLastError = true, StringMarshalling = StringMarshalling.Utf8)]
    private static partial int Open(string path, int flags);

    [LibraryImport("libc", EntryPoint = "lseek", SetLastError = true)]
    private static partial long LSeek(SafeFileHandle fd, long offset, int whence);

    [LibraryImport("libc", EntryPoint = "fallocate", SetLastError = true)]
    private static partial int Fallocate(SafeFileHandle fd, int mode, long offset, long len);

    [LibraryImport("libc", EntryPoint = "fstat", SetLastError = true)]
    private static unsafe partial int Fstat(SafeFileHandle fd, byte* buf);

    /// <summary>
    /// file-posix's find_allocation: whether <paramref name="offset"/> is in data or a hole, and where
    /// that extent ends. Null when the file system cannot tell (then everything counts as data).
    /// </summary>
    public static (bool Data, long End)? FindAllocation(SafeFileHandle fd, long offset, long fileLength)
    {
        if (!OperatingSystem.IsLinux())
        {
            return null;
        }
        var data = LSeek(fd, offset, SeekData);
        if (data < 0)
        {
            // ENXIO: no data after offset, the rest of the file is a hole.
            return Marshal.GetLastPInvokeError() == Enxio ? (false, long.MaxValue) : null;
        }
        if (data > offset)
        {
            return (false, data);
        }
        var hole = LSeek(fd, offset, SeekHole);
        if (hole < 0)
        {
            return null;
        }
        return (true, Math.Min(hole, fileLength));
    }

    public static bool PunchHole(SafeFileHandle fd, long offset, long length)
        => OperatingSystem.IsLinux() && Fallocate(fd, FallocPunchHole | FallocKeepSize, offset, length) == 0;

    /// <summary>posix_fallocate-like: allocates the range, growing the file if needed.</summary>
    public static bool Allocate(SafeFileHandle fd, long offset, long length)
        => OperatingSystem.IsLinux() && Fallocate(fd, 0, offset, length) == 0;

    public static bool ZeroRange(SafeFileHandle fd, long offset, long length)
        => OperatingSystem.IsLinux() && Fallocate(fd, FallocZeroRange | FallocKeepSize, offset, length) == 0;

    /// <summary>st_blocks × 512, as qemu-img's "disk size"; -1 when unknown.</summary>
    public static unsafe long AllocatedBytes(SafeFileHandle fd)
    {
        // st_blocks sits at byte 64 of struct stat on 64-bit Linux (x86_64 and the generic arm64 layout).
        if (!OperatingSystem.IsLinux() || !Environment.Is64BitProcess)
        {
            return -1;
        }
        var buf = stackalloc byte[256];
        return Fstat(fd, buf) != 0 ? -1 : *(long*)(buf + 64) * 512;
    }

    /// <summary>cache=none for plain files: an O_DIRECT handle.</summary>
    public static SafeFileHandle OpenDirect(string path, bool writable)
    {
        if (!OperatingSystem.IsLinux())
        {
            throw new PlatformNotSupportedException("cache=none (O_DIRECT) is implemented on Linux only");
        }
        var fd = Open(path, (writable ? ORdWr : ORdOnly) | ODirect | OCloExec);
        if (fd < 0)
        {
            throw new IOException(Marshal.GetPInvokeErrorMessage(Marshal.GetLastPInvokeError()));
        }
        return new SafeFileHandle(fd, ownsHandle: true);
    }
}
