using System.Runtime.InteropServices;
using Microsoft.Win32.SafeHandles;

namespace QcowTier.Storage;

/// <summary>The few Linux calls .NET does not expose: O_DIRECT opens, hole punching and allocated size.</summary>
internal static partial class NativeMethods
{
    private const int FallocFlKeepSize = 0x01;
    private const int FallocFlPunchHole = 0x02;
    private const int ORdOnly = 0x0;
    private const int ORdWr = 0x2;
    private const int OCloExec = 0x80000;

    private static int ODirect => RuntimeInformation.ProcessArchitecture switch
    {
        Architecture.Arm64 or Architecture.Arm => 0x10000,
        _ => 0x4000,
    };

    [LibraryImport("libc", EntryPoint = "open", SetLastError = true, StringMarshalling = StringMarshalling.Utf8)]
    private static partial int Open(string path, int flags);

    [LibraryImport("libc", EntryPoint = "fallocate", SetLastError = true)]
    private static partial int Fallocate(SafeFileHandle fd, int mode, long offset, long len);

    [LibraryImport("libc", EntryPoint = "fstat", SetLastError = true)]
    private static unsafe partial int Fstat(SafeFileHandle fd, byte* buf);

    /// <summary>Opens a file with O_DIRECT so reads and writes bypass the page cache (cache=none).</summary>
    public static SafeFileHandle OpenDirect(string path, bool writable)
    {
        if (!OperatingSystem.IsLinux())
        {
            throw new PlatformNotSupportedException("cache=none (O_DIRECT) is implemented on Linux only");
        }
        var fd = Open(path, (writable ? ORdWr : ORdOnly) | ODirect | OCloExec);
        if (fd < 0)
        {
            var errno = Marshal.GetLastPInvokeError();
            throw new IOException($"{path}: cannot open with O_DIRECT ({Marshal.GetPInvokeErrorMessage(errno)})");
        }
        return new SafeFileHandle(fd, ownsHandle: true);
    }

    /// <summary>Extends the file to <paramref name="end"/> (allocating the new tail) without ever shrinking it.</summary>
    public static bool Extend(SafeFileHandle fd, long end)
    {
        var length = RandomAccess.GetLength(fd);
        return end <= length || Fallocate(fd, 0, length, end - length) == 0;
    }

    /// <summary>fallocate mode 0 over a range: reserves the blocks (unwritten extents read as zeroes), growing the file.</summary>
    public static bool Reserve(SafeFileHandle fd, long offset, long length)
        => length <= 0 || Fallocate(fd, 0, offset, length) == 0;

    public static bool PunchHole(SafeFileHandle fd, long offset, long length)
        => Fallocate(fd, FallocFlPunchHole | FallocFlKeepSize, offset, length) == 0;

    public static unsafe long AllocatedBytes(SafeFileHandle fd)
    {
        // struct stat on 64-bit Linux (x86_64 and the generic layout of arm64) keeps st_blocks at byte 64.
        if (!Environment.Is64BitProcess)
        {
            return -1;
        }
        var buf = stackalloc byte[256];
        if (Fstat(fd, buf) != 0)
        {
            return -1;
        }
        return *(long*)(buf + 64) * 512;
    }
}
