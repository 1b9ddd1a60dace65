using System.Runtime.InteropServices;
using Microsoft.Win32.SafeHandles;

namespace QcowTier.Storage;

/// <summary>
/// QEMU-compatible image locking: open-file-description byte locks at offset 100 + permission bit
/// (what a user holds) and 200 + permission bit (what it refuses to share), as QEMU's file-posix
/// driver takes them. A writer thus keeps qemu-img and a running VM away from an image we are
/// writing, and is kept away from theirs, with QEMU's own messages.
/// </summary>
internal static partial class ImageLock
{
    private const int PermBase = 100;
    private const int SharedBase = 200;
    private const int ConsistentRead = 0;
    private const int Write = 1;
    private const int WriteUnchanged = 2;
    private const int Resize = 3;
    private static readonly string[] PermNames = ["consistent read", "write", "write unchanged", "resize"];

    private const int FOfdGetLk = 36;
    private const int FOfdSetLk = 37;
    private const short FRdLck = 0;
    private const short FWrLck = 1;
    private const short FUnLck = 2;

    [StructLayout(LayoutKind.Sequential)]
    private struct Flock
    {
        public short Type;
        public short Whence;
        public long Start;
        public long Len;
        public int Pid;
        public int Pad;
    }

    [LibraryImport("libc", EntryPoint = "fcntl", SetLastError = true)]
    private static unsafe partial int Fcntl(SafeFileHandle fd, int cmd, Flock* lk);

    /// <summary>Takes the locks for a reader (shares everything but write) or a writer (shares nothing but reads).</summary>
    public static void Acquire(SafeFileHandle fd, bool writable, string? path)
    {
        if (!OperatingSystem.IsLinux() || !Environment.Is64BitProcess)
        {
            return;
        }
        int[] perms = writable ? [ConsistentRead, Write, WriteUnchanged, Resize] : [ConsistentRead];
        int[] unshared = writable ? [Write, Resize] : [Write];
        foreach (var p in perms)
        {
            if (!Set(fd, FRdLck, PermBase + p))
            {
                return; // the file system has no OFD locks: QEMU then runs unlocked too
            }
        }
        foreach (var u in unshared)
        {
            Set(fd, FRdLck, SharedBase + u);
        }
        // A conflict may be our own just-closed descriptor, still shared with a child process between
        // its fork and its exec (which closes it): look again for a short while before refusing.
        for (var attempt = 0; ; attempt++)
        {
            var conflict = Conflict(fd, perms, unshared, path);
            if (conflict is null)
            {
                return;
            }
            if (attempt == 40)
            {
                throw new QcowException(conflict);
            }
            Thread.Sleep(10);
        }
    }

    private static string? Conflict(SafeFileHandle fd, int[] perms, int[] unshared, string? path)
    {
        foreach (var p in perms)
        {
            if (HeldByOthers(fd, SharedBase + p))
            {
                return $"Failed to get \"{PermNames[p]}\" lock\nIs another process using the image [{path}]?";
            }
        }
        foreach (var u in unshared)
        {
            if (HeldByOthers(fd, PermBase + u))
            {
                return $"Failed to get shared \"{PermNames[u]}\" lock\nIs another process using the image [{path}]?";
            }
        }
        return null;
    }

    private static unsafe bool Set(SafeFileHandle fd, short type, long offset)
    {
        var lk = new Flock { Type = type, Whence = 0, Start = offset, Len = 1 };
        return Fcntl(fd, FOfdSetLk, &lk) == 0;
    }

    private static unsafe bool HeldByOthers(SafeFileHandle fd, long offset)
    {
        var lk = new Flock { Type = FWrLck, Whence = 0, Start = offset, Len = 1 };
        return Fcntl(fd, FOfdGetLk, &lk) == 0 && lk.Type != FUnLck;
    }
}
