using System.Runtime.InteropServices;
using Microsoft.Win32.SafeHandles;

namespace QcowTier.Storage;

/// <summary>File identity (device and inode) and real paths, for backing chains: loops are found by identity, not by name.</summary>
internal static partial class NativeMethods
{
    private const int AtFdCwd = -100;
    private const int AtEmptyPath = 0x1000;
    private const uint StatxBasicStats = 0x7ff;
    // struct statx has one layout on every architecture.
    private const int StatxModeOffset = 28;
    private const int StatxInoOffset = 32;
    private const int StatxDevMajorOffset = 136;
    private const int StatxDevMinorOffset = 140;
    private const int StatxSize = 256;
    private const ushort SIfMt = 0xf000;
    private const ushort SIfReg = 0x8000;

    [LibraryImport("libc", EntryPoint = "statx", SetLastError = true, StringMarshalling = StringMarshalling.Utf8)]
    private static unsafe partial int StatxFd(SafeFileHandle dirfd, string path, int flags, uint mask, byte* buf);

    [LibraryImport("libc", EntryPoint = "statx", SetLastError = true, StringMarshalling = StringMarshalling.Utf8)]
    private static unsafe partial int StatxPath(int dirfd, string path, int flags, uint mask, byte* buf);

    [LibraryImport("libc", EntryPoint = "realpath", SetLastError = true, StringMarshalling = StringMarshalling.Utf8)]
    private static partial nint RealPathNative(string path, nint resolved);

    [LibraryImport("libc", EntryPoint = "free")]
    private static partial void Free(nint p);

    /// <summary>(device, inode, regular file) of an open file, or null where the platform cannot tell.</summary>
    public static unsafe (ulong Dev, ulong Ino, bool Regular)? Identity(SafeFileHandle fd)
    {
        if (!OperatingSystem.IsLinux())
        {
            return null;
        }
        var buf = stackalloc byte[StatxSize];
        return StatxFd(fd, "", AtEmptyPath, StatxBasicStats, buf) == 0 ? Decode(buf) : null;
    }

    /// <summary>(device, inode, regular file) of a path (links followed), or null when it cannot be found.</summary>
    public static unsafe (ulong Dev, ulong Ino, bool Regular)? Identity(string path)
    {
        if (!OperatingSystem.IsLinux())
        {
            return null;
        }
        var buf = stackalloc byte[StatxSize];
        return StatxPath(AtFdCwd, path, 0, StatxBasicStats, buf) == 0 ? Decode(buf) : null;
    }

    private static unsafe (ulong, ulong, bool) Decode(byte* buf)
    {
        var mode = *(ushort*)(buf + StatxModeOffset);
        var ino = *(ulong*)(buf + StatxInoOffset);
        var dev = ((ulong)*(uint*)(buf + StatxDevMajorOffset) << 32) | *(uint*)(buf + StatxDevMinorOffset);
        return (dev, ino, (mode & SIfMt) == SIfReg);
    }

    /// <summary>The canonical path (every symbolic link, "." and ".." resolved), or null when it does not exist.</summary>
    public static string? RealPath(string path)
    {
        if (!OperatingSystem.IsLinux())
        {
            return File.Exists(path) || Directory.Exists(path) ? Path.GetFullPath(path) : null;
        }
        var p = RealPathNative(path, 0);
        if (p == 0)
        {
            return null;
        }
        try
        {
            return Marshal.PtrToStringUTF8(p);
        }
        finally
        {
            Free(p);
        }
    }

    /// <summary>The path an open descriptor really refers to (Linux: /proc/self/fd), or null.</summary>
    public static string? OpenedPath(SafeFileHandle fd)
    {
        if (!OperatingSystem.IsLinux())
        {
            return null;
        }
        try
        {
            return new FileInfo($"/proc/self/fd/{fd.DangerousGetHandle()}").LinkTarget;
        }
        catch (IOException)
        {
            return null;
        }
    }
}
