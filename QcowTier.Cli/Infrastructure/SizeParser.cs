using System.Globalization;

namespace QcowTier.Cli.Infrastructure;

/// <summary>qemu_strtosz: decimal or 0x-hex bytes, optional fraction, optional suffix b/k/M/G/T/P/E (powers of 1024).</summary>
internal static class SizeParser
{
    internal enum Outcome
    {
        Ok,
        Invalid,
        OutOfRange,
    }

    public static Outcome TryParse(string text, out ulong value)
    {
        value = 0;
        var s = text.AsSpan();
        var i = 0;
        while (i < s.Length && char.IsWhiteSpace(s[i]))
        {
            i++;
        }
        if (i < s.Length && s[i] == '-')
        {
            return Outcome.Invalid;
        }
        if (i < s.Length && s[i] == '+')
        {
            i++;
        }
        var digitsStart = i;
        if (i + 1 < s.Length && s[i] == '0' && (s[i + 1] == 'x' || s[i + 1] == 'X'))
        {
            // Hex: a suffix may follow, a fraction may not (as qemu_strtosz in QEMU 7.2).
            i += 2;
            var hexStart = i;
            while (i < s.Length && Uri.IsHexDigit(s[i]))
            {
                i++;
            }
            if (i == hexStart || !ulong.TryParse(s[hexStart..i], NumberStyles.AllowHexSpecifier, CultureInfo.InvariantCulture, out var hex))
            {
                return i == hexStart ? Outcome.Invalid : Outcome.OutOfRange;
            }
            return Scale(hex, 0, s[i..], out value);
        }
        while (i < s.Length && char.IsAsciiDigit(s[i]))
        {
            i++;
        }
        if (i == digitsStart)
        {
            return Outcome.Invalid;
        }
        if (!ulong.TryParse(s[digitsStart..i], NumberStyles.None, CultureInfo.InvariantCulture, out var whole))
        {
            return Outcome.OutOfRange;
        }
        decimal fraction = 0;
        if (i < s.Length && s[i] == '.')
        {
            var fracStart = i;
            i++;
            while (i < s.Length && char.IsAsciiDigit(s[i]))
            {
                i++;
            }
            if (i - fracStart > 1)
            {
                fraction = decimal.Parse("0" + s[fracStart..i].ToString(), NumberStyles.AllowDecimalPoint, CultureInfo.InvariantCulture);
            }
        }
        return Scale(whole, fraction, s[i..], out value);
    }

    /// <summary>Applies the optional unit suffix (the only thing allowed after the number).</summary>
    private static Outcome Scale(ulong whole, decimal fraction, ReadOnlySpan<char> rest, out ulong value)
    {
        value = 0;
        ulong mul = 1;
        if (!rest.IsEmpty)
        {
            var m = Multiplier(rest[0]);
            if (m == 0 || rest.Length != 1)
            {
                return Outcome.Invalid;
            }
            mul = m;
        }
        if (mul == 1 && fraction != 0)
        {
            // A fraction needs a unit to scale it.
            return Outcome.Invalid;
        }
        var total = (UInt128)whole * mul + (UInt128)decimal.Round(fraction * mul, MidpointRounding.AwayFromZero);
        if (total > ulong.MaxValue)
        {
            return Outcome.OutOfRange;
        }
        value = (ulong)total;
        return Outcome.Ok;
    }

    private static ulong Multiplier(char c) => char.ToUpperInvariant(c) switch
    {
        'B' => 1,
        'K' => 1UL << 10,
        'M' => 1UL << 20,
        'G' => 1UL << 30,
        'T' => 1UL << 40,
        'P' => 1UL << 50,
        'E' => 1UL << 60,
        _ => 0,
    };

    /// <summary>qemu-img's cvtnum: a size for the named parameter, with qemu-img's error text.</summary>
    public static long Parse(string name, string text, long min = 0, long max = long.MaxValue)
    {
        var outcome = TryParse(text, out var v);
        if (outcome == Outcome.Invalid)
        {
            throw new CliException($"Invalid {name} specified. You may use k, M, G, T, P or E suffixes for kilobytes, megabytes, gigabytes, terabytes, petabytes and exabytes.");
        }
        if (outcome == Outcome.OutOfRange || v > (ulong)max || (long)v < min)
        {
            throw new CliException($"Invalid {name} specified. Must be between {min} and {max}.");
        }
        return (long)v;
    }

    /// <summary>A plain integer as qemu_strtoul with base 0 reads it (decimal, 0x hex, 0 octal).</summary>
    public static bool TryParseInteger(string text, out ulong value)
    {
        value = 0;
        if (text.Length == 0 || text[0] == '-')
        {
            return false;
        }
        if (text.StartsWith("0x", StringComparison.OrdinalIgnoreCase))
        {
            return text.Length > 2 && ulong.TryParse(text.AsSpan(2), NumberStyles.AllowHexSpecifier, CultureInfo.InvariantCulture, out value);
        }
        if (text.Length > 1 && text[0] == '0')
        {
            try
            {
                value = Convert.ToUInt64(text, 8);
                return true;
            }
            catch (FormatException)
            {
                return false;
            }
            catch (OverflowException)
            {
                return false;
            }
        }
        return ulong.TryParse(text, NumberStyles.None, CultureInfo.InvariantCulture, out value);
    }
}
